"""Pad rows reach the routers marked by Megatron's padding mask: they are absent from PR2's
recorded predictor inputs and from the routing metrics, and change nothing else."""

import types

import torch

from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.routing.metrics import same_expert_set
from megatron_pr2.routing.route_plan import RoutePlan
from megatron_pr2.routing.router import unpadded_token_count
from megatron_pr2.training.padding_mask import pad_token_mask, stage_padding_mask
from tests.megatron.test_router_replay import build, random_routes, tokens_and_positions

B, S = 2, 8


def _pad_mask():
    sample_of = torch.zeros(B, S, dtype=torch.long)
    sample_of[0, 5:] = -1  # row 0: 3 pad tokens at the end
    sample_of[1, 7:] = -1  # row 1: 1 pad token
    return pad_token_mask(sample_of)


def _router_rows(pad_BS, keep_pad: bool) -> list[int]:
    """Router token order is sequence-first: row s * B + b holds token (b, s)."""
    return [s * B + b for s in range(S) for b in range(B) if bool(pad_BS[b, s]) == keep_pad]


def _pass(model, controller, mode, batch, pad=None, plan=None):
    tokens, positions = batch
    controller.begin_step(mode, plan=plan)
    controller.set_microbatch(0)
    with torch.no_grad():
        logits = model(tokens, positions, None, padding_mask=pad)
    return logits, controller.end_step()


def test_pad_rows_are_not_recorded_for_the_predictor(megatron_single_process):
    _, model = build(seed=3)
    controller = RoutingController(model)
    batch, pad = tokens_and_positions(seed=4, s=S, b=B), _pad_mask()
    unmasked, _ = _pass(model, controller, "predict", batch)
    masked, _ = _pass(model, controller, "predict", batch, pad)
    assert torch.equal(masked, unmasked)  # the mask only changes bookkeeping
    real = _router_rows(pad, keep_pad=False)
    for router in controller.routers:
        sample = router.replay_state.predictor_samples[0]
        assert sample.token_rows.tolist() == real
        assert sample.hidden_TH.shape[0] == sample.logits_TE.shape[0] == len(real)
        assert sample.num_rows == B * S


def test_pad_rows_are_not_counted_in_routing_metrics(megatron_single_process):
    _, model = build(seed=5)
    controller = RoutingController(model)
    batch, pad = tokens_and_positions(seed=6, s=S, b=B), _pad_mask()
    _, live = _pass(model, controller, "record", batch)
    plan = RoutePlan()
    for router in controller.routers:
        forced = random_routes(B * S, router.num_experts, router.topk, seed=router.layer_number)
        plan.add(0, router.layer_number, forced)
    _, step = _pass(model, controller, "replay", batch, pad, plan=plan)
    real = torch.tensor(_router_rows(pad, keep_pad=False))
    for layer, metrics in step.metrics.items():
        forced = plan.get(0, layer).widened(torch.device("cpu"))[real]
        live_ids = live.routes.get(0, layer).widened(torch.device("cpu"))[real]
        assert metrics.replay_tokens == len(real)
        expected = float(same_expert_set(forced, live_ids).float().mean())
        assert metrics.summary()["zero_deviation_ratio"] == expected


def test_later_pipeline_stages_get_their_sequence_parallel_slice():
    pad = torch.arange(B * S).reshape(B, S) % 3 == 0
    group = types.SimpleNamespace(size=lambda: 2, rank=lambda: 1)

    def chunk(pre_process, sequence_parallel):
        return types.SimpleNamespace(pre_process=pre_process, pg_collection=types.SimpleNamespace(
            tp=group), config=types.SimpleNamespace(sequence_parallel=sequence_parallel))

    assert stage_padding_mask(pad, chunk(True, True)) is pad  # GPTModel scatters it itself
    assert stage_padding_mask(pad, chunk(False, False)) is pad
    assert torch.equal(stage_padding_mask(pad, chunk(False, True)), pad[:, S // 2:])


def test_the_actor_passes_the_padding_mask_of_its_microbatches(megatron_single_process):
    from megatron_pr2.rl.losses import PolicyLossConfig
    from megatron_pr2.rollout.alignment import TokenParallel
    from megatron_pr2.rollout.sample import Sample
    from megatron_pr2.training.actor import PolicyActor
    from megatron_pr2.training.rollout_batch import build_train_microbatches

    _, model = build(seed=7)
    controller = RoutingController(model)
    lengths = [8, 5, 3, 6]  # padded to width 8 in micro-batches of 2
    samples = [Sample(torch.arange(n) + 3 * i, prompt_length=2,
                      rollout_log_probs=torch.zeros(n - 2)) for i, n in enumerate(lengths)]
    microbatches = build_train_microbatches(samples, range(4), torch.zeros(4), 2,
                                            TokenParallel(), pad_token_id=0)
    actor = PolicyActor([model], None, PolicyLossConfig(), controller)
    actor.logprob_pass(microbatches, "predict")
    for mb in microbatches:
        pad = mb.grid.sample_of < 0
        batch, seq = pad.shape
        real = [s * batch + b for s in range(seq) for b in range(batch) if not pad[b, s]]
        for router in controller.routers:
            assert router.replay_state.predictor_samples[mb.microbatch_id].token_rows.tolist() \
                == real


def test_per_token_predictor_loss_scale_is_the_host_count_kept_on_the_device():
    """The predictor loss scale under ``calculate_per_token_loss`` equals the former
    ``int((~pad_T).sum())`` read back to the host, as a tensor where the mask is."""
    gen = torch.Generator().manual_seed(3)
    loss = torch.rand((), generator=gen) * 7
    masks = [torch.rand(37, generator=gen) < 0.3, torch.zeros(5, dtype=torch.bool),
             torch.ones(4, dtype=torch.bool)]
    for pad_T in masks:
        count = unpadded_token_count(pad_T, pad_T.numel())
        assert isinstance(count, torch.Tensor) and count.device == pad_T.device
        scaled = loss * count
        assert scaled.dtype == loss.dtype
        assert torch.equal(scaled, loss * int((~pad_T).sum()))
    assert unpadded_token_count(None, 12) == 12

