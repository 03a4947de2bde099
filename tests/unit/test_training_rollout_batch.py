"""The engine's log-prob of each label, gathered without a Python loop over tokens."""

import torch

from megatron_pr2.rollout.alignment import build_micro_batch
from megatron_pr2.rollout.sample import Sample
from megatron_pr2.training.rollout_batch import _label_rollout_logp


def _sample(prompt, response, with_logp=True, seed=0):
    tokens = torch.tensor(prompt + response)
    logp = -torch.rand(len(response), generator=torch.Generator().manual_seed(seed)) \
        if with_logp else None
    return Sample(tokens, len(prompt), rollout_log_probs=logp)


def test_label_logp_matches_the_per_token_definition():
    samples = [
        _sample([1, 2, 3], [4, 5], seed=1),
        _sample([6], [7, 8, 9, 10], seed=2),
        _sample([11, 12], [13, 14, 15], with_logp=False),  # engine gave no log-probs
        _sample([16, 17, 18, 19], [20], seed=3),
    ]
    indices = [3, 0, 2, 1]
    layout = build_micro_batch(samples, indices, "bshd")
    width = layout.tokens.shape[1]
    # position s of row b predicts the token at s + 1: a label is a response token when
    # s + 1 lies in [P, T) of the row's sample
    mask = torch.zeros(len(indices), width, dtype=torch.bool)
    expected = torch.zeros(len(indices), width)
    for b, index in enumerate(indices):
        sample = samples[index]
        for s in range(width - 1):
            if sample.prompt_length <= s + 1 < sample.total_length:
                mask[b, s] = True
                if sample.rollout_log_probs is not None:
                    expected[b, s] = sample.rollout_log_probs[s + 1 - sample.prompt_length]
    got = _label_rollout_logp(layout, samples, mask)
    assert got.dtype == torch.float32 and got.shape == mask.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert int(mask.sum()) == 2 + 4 + 3 + 1


def test_label_logp_of_an_empty_mask_is_zero():
    samples = [_sample([1, 2], [3], seed=4)]
    layout = build_micro_batch(samples, [0], "bshd")
    mask = torch.zeros(layout.tokens.shape, dtype=torch.bool)
    assert not _label_rollout_logp(layout, samples, mask).any()
