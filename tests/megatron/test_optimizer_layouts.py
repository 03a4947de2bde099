"""bf16 / distributed optimizer / clipping / alltoall on 2 gloo processes vs one process.

Per layout (TP=2+SP, EP=2, PP=2, DP=2) one spawn runs: fp32 + distributed optimizer (weights
after the clipped steps within 1e-6 of one process, and the global grad norm equal to
``torch.nn.utils.clip_grad_norm_`` over the single process's gradients), and bf16 + distributed
optimizer (within bf16 tolerance of one bf16 process). On EP=2 the alltoall dispatcher runs too and
must give the allgather dispatcher's losses, grad norms and weights.
"""

import os

import pytest
import torch

from megatron_pr2.training.checkpoint.model_weights import read_full_tensors
from tests.megatron import optimizer_worker
from tests.multiproc import run_distributed

LAYOUTS = {
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2": dict(expert_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "dp2": dict(),
}
FP32_DIST = {"name": "fp32_dist", "distributed_optimizer": True}
BF16_DIST = {"name": "bf16_dist", "distributed_optimizer": True, "bf16": True}
FP32_ALLTOALL = {"name": "fp32_alltoall", "distributed_optimizer": True, "dispatcher": "alltoall"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, initial_checkpoint):
    init_dir = initial_checkpoint("qwen3")
    out_dir = str(tmp_path_factory.mktemp("opt_ref") / "single")
    runs = [{"name": "fp32", "reference_norm": True}, {"name": "bf16", "bf16": True}]
    (results,) = run_distributed(optimizer_worker.train_runs, 1, "qwen3", {}, init_dir, out_dir,
                                 runs)
    weights = {name: read_full_tensors(os.path.join(out_dir, name)) for name in ("fp32", "bf16")}
    return init_dir, results, weights, read_full_tensors(init_dir)


def _assert_weights(got, expected, rtol, atol, what):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"{what} {k}: {m}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_precision_and_distributed_optimizer_match_one_process(reference, layout, tmp_path):
    init_dir, ref, ref_weights, initial = reference
    runs = [FP32_DIST, BF16_DIST] + ([FP32_ALLTOALL] if layout == "ep2" else [])
    results = run_distributed(optimizer_worker.train_runs, 2, "qwen3", LAYOUTS[layout], init_dir,
                              str(tmp_path), runs)
    got = results[0]
    assert results[1]["fp32_dist"]["grad_norm"] == got["fp32_dist"]["grad_norm"]
    # clipping is active and the global norm is PyTorch's norm over the one-process gradients
    assert min(ref["fp32"]["reference_norm"]) > optimizer_worker.CLIP
    assert got["fp32_dist"]["grad_norm"] == pytest.approx(ref["fp32"]["reference_norm"],
                                                          rel=1e-5)
    # the policy-only norm (router weights excluded, clipping undone) is PyTorch's norm over
    # the one-process gradients of the other parameters, in every layout and precision
    policy = ref["fp32"]["reference_policy_norm"]
    assert min(policy) > 0 and all(p < n for p, n in zip(policy, ref["fp32"]["reference_norm"]))
    assert ref["fp32"]["policy_norm"] == pytest.approx(policy, rel=1e-5)
    assert got["fp32_dist"]["policy_norm"] == pytest.approx(policy, rel=1e-5)
    assert got["bf16_dist"]["policy_norm"] == pytest.approx(ref["bf16"]["policy_norm"], rel=2e-2)
    assert got["fp32_dist"]["loss"] == pytest.approx(ref["fp32"]["loss"], rel=1e-5, abs=1e-6)
    weights = {run["name"]: read_full_tensors(tmp_path / run["name"]) for run in runs}
    _assert_weights(weights["fp32_dist"], ref_weights["fp32"], 1e-5, 1e-6, "fp32")
    moved = max((ref_weights["fp32"][k] - initial[k]).abs().max() for k in initial)
    assert moved > 5e-3  # the steps changed the weights far beyond the bf16 tolerance below
    _assert_weights(weights["bf16_dist"], ref_weights["bf16"], 2e-2, 2e-3, "bf16")
    assert got["bf16_dist"]["loss"] == pytest.approx(ref["bf16"]["loss"], rel=1e-2)
    if layout == "ep2":
        alltoall = got["fp32_alltoall"]
        assert alltoall["loss"] == pytest.approx(got["fp32_dist"]["loss"], rel=1e-6)
        assert alltoall["grad_norm"] == pytest.approx(got["fp32_dist"]["grad_norm"], rel=1e-6)
        _assert_weights(weights["fp32_alltoall"], weights["fp32_dist"], 1e-6, 1e-7, "alltoall")
