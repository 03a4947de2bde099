"""Lookahead routing under Megatron's distributed optimizer, on 2 gloo processes (DP=2).

One spawn runs, per precision (fp32, bf16), the plain optimizer and the distributed optimizer
from the same checkpoint on the same batches: two clipped Adam steps, then live routes recorded
at theta_0 (R2), at ``theta_0 + s u`` with ``u = 0`` (lr 0: the whole shift/gather/restore path
with a zero step) and at ``theta_0 + 1.5 u``. Under the distributed optimizer each rank forms
``u`` only for its slice of the parameter buffer and the buffer is all-gathered; the plain
optimizer forms it for every whole parameter. Checked: the shifted weights are replicated bit for
bit and equal the plain optimizer's, the routes equal the plain optimizer's, ``u = 0`` is R2 bit
for bit, and the weights after each shifted forward are bit-identical to before (fp32: from a
host copy of the slice a rank updates; bf16: cast again from the fp32 main shard, no copy). EP=2 (dense
parameters sharded over DP=2 by one distributed optimizer, experts unsharded by another) runs
the same against EP=2 with the plain optimizer.
"""

import pytest
import torch

from tests.megatron.test_lookahead_parallel import train_steps
from tests.megatron.test_router_parallel import (  # noqa: F401 (fixtures)
    HF_CONFIG,
    _microbatches,
    _run_schedule,
    checkpoint,
    rollouts,
)
from tests.multiproc import run_distributed

SCALE = 1.5
STEPS = 2
RUNS = [  # (name, layout, bf16, distributed optimizer)
    ("fp32", {}, False, False),
    ("fp32_dist", {}, False, True),
    ("bf16", {}, True, False),
    ("bf16_dist", {}, True, True),
    ("ep2", {"expert_model_parallel_size": 2}, False, False),
    ("ep2_dist", {"expert_model_parallel_size": 2}, False, True),
]
PAIRS = [("fp32", "fp32_dist"), ("bf16", "bf16_dist"), ("ep2", "ep2_dist")]


def _record(model, controller, microbatches):
    controller.begin_step("record")
    _run_schedule(model, controller, microbatches, forward_only=True)
    return {key: r.expert_ids.clone() for key, r in controller.end_step().routes.routes.items()}


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in model for p in chunk.parameters()]


def _bit_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _lookahead_run(ckpt_dir, tokens, layout, bf16, distributed) -> dict:
    from megatron.core import parallel_state

    from megatron_pr2.convert.loading import load_megatron_checkpoint
    from megatron_pr2.models import ModelOptions, build_model_chunks
    from megatron_pr2.models.moe_options import precision_overrides
    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel
    from megatron_pr2.routing.controller import RoutingController
    from megatron_pr2.routing.router import ReplayRouter
    from megatron_pr2.routing.strategies.lookahead import WeightLookahead
    from megatron_pr2.training.model_setup import build_optimizer, wrap_with_ddp

    parallel = ParallelConfig(**layout)
    initialize_model_parallel(parallel)
    _, config, chunks = build_model_chunks(HF_CONFIG, parallel, ModelOptions(
        router_class=ReplayRouter, config_overrides=precision_overrides(bf16)))
    load_megatron_checkpoint(chunks, ckpt_dir)
    model = wrap_with_ddp(chunks, config, use_distributed_optimizer=distributed)
    optimizer = build_optimizer(model, lr=1e-2, optimizer="adam", weight_decay=0.1,
                                clip_grad=0.0, bf16=bf16, use_distributed_optimizer=distributed)
    for group in optimizer.param_groups:  # no scheduler: the constant LR and weight decay
        group["lr"], group["weight_decay"] = 1e-2, 0.1
    controller = RoutingController(model)
    microbatches = _microbatches(tokens, 0, parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())
    train_steps(model, optimizer, controller, microbatches, STEPS)

    before = _weights(model)
    result = {"r2": _record(model, controller, microbatches)}
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    zero = WeightLookahead(optimizer)  # u = 0 exactly: -0 * (Adam ratio) - 0 * wd * theta
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    with zero.shifted(SCALE):
        result["zero_shift_is_theta0"] = _bit_equal(_weights(model), before)
        result["zero"] = _record(model, controller, microbatches)
    result["restored_zero"] = _bit_equal(_weights(model), before)

    lookahead = WeightLookahead(optimizer)
    result["updated_numel"] = sum(s.model_param.numel() for s in lookahead.states)
    result["saved_bytes"] = lookahead.saved_bytes()
    result["param_numel"] = sum(p.numel() for p in before)
    with lookahead.shifted(SCALE):
        result["shifted"] = _weights(model)
        result["shifted_routes"] = _record(model, controller, microbatches)
    result["restored"] = _bit_equal(_weights(model), before)
    with lookahead.shifted(SCALE):  # the host copy is reused: a second shift is the same
        result["shifted_again"] = _bit_equal(_weights(model), result["shifted"])
    result["restored_again"] = _bit_equal(_weights(model), before)
    result["theta0"] = before
    controller.close()
    return result


def _rank_main(rank, ckpt_dir, tokens):
    from megatron_pr2.platform import destroy_model_parallel

    del rank
    results = {name: _lookahead_run(ckpt_dir, tokens, layout, bf16, distributed)
               for name, layout, bf16, distributed in RUNS}
    destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def runs(checkpoint, rollouts):  # noqa: F811
    return run_distributed(_rank_main, 2, checkpoint, rollouts[0])


def _same_routes(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    same = [(got[k].long().sort(-1).values == expected[k].long().sort(-1).values).all(-1)
            for k in expected]
    return float(torch.cat(same).float().mean())


@pytest.mark.parametrize("name", [name for name, *_ in RUNS])
def test_zero_step_is_r2_and_weights_are_restored_bit_for_bit(runs, name):
    for rank, results in enumerate(runs):
        result = results[name]
        assert result["zero_shift_is_theta0"], f"rank {rank}"
        assert _same_routes(result["zero"], result["r2"]) == 1.0, f"rank {rank}"
        for key in ("restored_zero", "restored", "shifted_again", "restored_again"):
            assert result[key], f"rank {rank}: {key}"


@pytest.mark.parametrize("plain, sharded", PAIRS)
def test_distributed_optimizer_shifts_like_the_plain_optimizer(runs, plain, sharded):
    for rank, results in enumerate(runs):
        ref, got = results[plain], results[sharded]
        # both optimizers trained to the same theta_0 (no clipping: the same update bits)
        assert _bit_equal(got["theta0"], ref["theta0"]), f"rank {rank}"
        moved = max(float((s.float() - t.float()).abs().max())
                    for s, t in zip(ref["shifted"], ref["theta0"]))
        assert moved > 5e-3, "the shift should move the weights"
        # the same Adam state, sharded or whole: u and the shifted weights are the same bits
        assert _bit_equal(got["shifted"], ref["shifted"]), f"rank {rank}"
        assert _same_routes(got["shifted_routes"], ref["shifted_routes"]) >= 0.97, f"rank {rank}"
        assert _same_routes(ref["shifted_routes"], ref["r2"]) < 1.0, "the shift moves routes"
    if plain != "ep2":  # (EP=2: each rank holds other experts)
        # the all-gather completes every rank's shifted weights: replicated bit for bit
        assert _bit_equal(runs[0][sharded]["shifted"], runs[1][sharded]["shifted"])


def test_the_distributed_optimizer_shifts_and_saves_only_the_slice_a_rank_updates(runs):
    for name in ("fp32_dist", "bf16_dist"):
        updated = [results[name]["updated_numel"] for results in runs]
        total = runs[0][name]["param_numel"]
        assert sum(updated) == total  # the two slices partition the weights (DP = 2)
        assert max(updated) < 0.51 * total  # half each, up to the buffer's alignment padding
        assert runs[0][name.split("_")[0]]["updated_numel"] == total  # plain: every weight
    for results in runs:
        # fp32: a host copy of the slice; bf16: rebuilt from the fp32 main shard, no copy
        assert results["fp32_dist"]["saved_bytes"] == 4 * results["fp32_dist"]["updated_numel"]
        assert results["fp32"]["saved_bytes"] == 4 * results["fp32"]["param_numel"]
        assert results["bf16_dist"]["saved_bytes"] == results["bf16"]["saved_bytes"] == 0
