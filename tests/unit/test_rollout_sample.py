"""The Sample contract and sampling parameters reject inconsistent data with clear errors."""

import pytest
import torch

from megatron_pr2.rollout.sample import Sample, SamplingParams


def test_valid_sample_properties():
    sample = Sample(torch.arange(7), prompt_length=3, rollout_log_probs=torch.zeros(4),
                    routed_experts=torch.zeros(6, 2, 2, dtype=torch.uint8))
    assert sample.response_length == 4 and sample.response_tokens.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_length": 0}, "prompt_length 0 outside"),
    ({"prompt_length": 3, "rollout_log_probs": torch.zeros(3)}, r"one per response token"),
    ({"prompt_length": 3, "routed_experts": torch.zeros(7, 2, 2, dtype=torch.uint8)}, r"\[T-1=6, L, K\]"),
    ({"prompt_length": 3, "routed_experts": torch.zeros(6, 2, 2)}, "must be integer"),
])
def test_inconsistent_sample_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sample(torch.arange(7), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
])
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_greedy_allows_zero_temperature():
    assert SamplingParams(greedy=True, temperature=0.0).greedy
