"""A distributed-optimizer checkpoint (``dp_reshardable``) resumes exactly, at DP=2 and at DP=1.

Two gloo processes (DP=2) train a tiny Qwen3-MoE with Megatron's distributed optimizer, a
warm-up + cosine schedule and clipping, checkpoint after ``SAVED`` steps through the trainer's
``checkpointing`` module and train on (the uninterrupted reference). Resumed from that checkpoint:

* at DP=2 (fp32; bf16 with fp32 main params; EP=2 with chained dense and expert optimizers):
  every rank's Adam state (main params, both moments, the step count of every parameter) equals
  what it saved, bit for bit, and the weights after the remaining steps equal the uninterrupted
  run's;
* at DP=1 (the state resharded over one rank): the full state's squared norms per parameter group
  equal the two saved shards' sum, step counts and learning rates equal the saved ones, and the
  weights after the remaining steps match the uninterrupted DP=2 run within fp32 reduction noise.
"""

import pytest
import torch

from megatron_pr2.training.checkpoint.model_weights import read_full_tensors
from tests.megatron import distopt_resume_worker as worker
from tests.multiproc import run_distributed

PRECISIONS = ("fp32", "bf16")
# EP=2 on two ranks: the dense and the expert parameters get one distributed optimizer each
# (chained), sharded over DP=2 and expert-DP=1
RUNS = {"fp32": {}, "bf16": {"bf16": True}, "fp32_ep2": {"layout": {"expert_model_parallel_size": 2}}}


def _runs(root, resume: bool, dp: int) -> list[dict]:
    names = RUNS if dp == 2 else PRECISIONS
    return [{"name": name, **RUNS[name],
             "weights_to": str(root / f"{name}_dp{dp}_{'resumed' if resume else 'straight'}"),
             **({"resume_from": str(root / f"{name}_ckpt")} if resume
                else {"save_to": str(root / f"{name}_ckpt")})}
            for name in names]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, initial_checkpoint):
    root = tmp_path_factory.mktemp("distopt_resume")
    init_dir = initial_checkpoint("qwen3")
    straight = run_distributed(worker.train_runs, 2, init_dir, _runs(root, False, 2))
    resumed2 = run_distributed(worker.train_runs, 2, init_dir, _runs(root, True, 2))
    (resumed1,) = run_distributed(worker.train_runs, 1, init_dir, _runs(root, True, 1))
    return root, straight, resumed2, resumed1


def _weights(root, name):
    return read_full_tensors(str(root / name))


def _assert_same_weights(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key].float(), value.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("precision", sorted(RUNS))
def test_resume_at_dp2_restores_every_rank_s_adam_state_exactly(runs, precision):
    root, straight, resumed, _ = runs
    for rank in range(2):
        saved = straight[rank][precision]["saved_local"]
        loaded = resumed[rank][precision]["loaded_local"]
        assert len(loaded) == len(saved) > 0
        for index, (got, want) in enumerate(zip(loaded, saved)):
            assert float(want["step"]) == worker.SAVED
            for key in want:
                assert torch.equal(got[key], want[key]), (rank, index, key)
        assert resumed[rank][precision]["scheduler_steps"] == worker.TOTAL
    assert resumed[0][precision]["loaded"] == straight[0][precision]["saved"]
    _assert_same_weights(_weights(root, f"{precision}_dp2_resumed"),
                         _weights(root, f"{precision}_dp2_straight"), rtol=0, atol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_at_dp1_reshards_the_adam_state(runs, precision):
    root, straight, _, resumed = runs
    saved, loaded = straight[0][precision]["saved"], resumed[precision]["loaded"]
    assert loaded.keys() == saved.keys()
    for group, want in saved.items():
        got = loaded[group]
        assert got["steps"] == want["steps"] == [float(worker.SAVED)], group
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), group
        assert got["weight_decay"] == want["weight_decay"], group
        assert got["sq_norms"] == pytest.approx(want["sq_norms"], rel=1e-6), group
    rtol, atol = (1e-6, 1e-7) if precision == "fp32" else (2e-2, 2e-3)  # reduction order
    _assert_same_weights(_weights(root, f"{precision}_dp1_resumed"),
                         _weights(root, f"{precision}_dp2_straight"), rtol=rtol, atol=atol)
