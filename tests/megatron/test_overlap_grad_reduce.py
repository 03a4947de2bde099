"""``--overlap-grad-reduce`` (Megatron's DDP reduces each gradient bucket during the last
micro-batch's backward) trains exactly like the synchronous reduction.

Two gloo processes (DP=2) run a warm-up and 2 RL iterations of 2 mini-steps each, with and
without the option, for R2 (a recorded route replayed) and PR2 (its predictor ``W_p`` is trained
from mini-step 2 only: Megatron's DDP used to assert in ``zero_grad_buffer`` because ``W_p`` had
no gradient in the first step). Metrics and the saved weights and Adam moments must agree. PR2
under the interleaved pipeline schedule (PP=2, 2 virtual stages), with the distributed optimizer
and with the optimizer predictor is compared on its metrics.
"""

import pytest
import torch

from megatron_pr2.training.checkpoint.model_weights import read_full_tensors
from tests.megatron import overlap_worker
from tests.multiproc import run_distributed

METHODS = ("r2", "pr2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("overlap"))
    return out_dir, run_distributed(overlap_worker.train_with_and_without_overlap, 2,
                                    list(METHODS), out_dir)[0]


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if isinstance(v, float | int) and not k.startswith("time/")}


def _assert_same_metrics(plain: dict, overlap: dict, trains_predictor: bool) -> None:
    assert plain["overlap_grad_reduce"] == [False] and overlap["overlap_grad_reduce"] == [True]
    assert len(plain["records"]) == len(overlap["records"]) == 2
    for expected, got in zip(plain["records"], overlap["records"]):
        assert expected["train/grad_norm"] > 0  # both iterations moved the weights
        assert _numbers(got).keys() == _numbers(expected).keys()
        for key, value in _numbers(expected).items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if trains_predictor:
        assert all(r["routing/predictor_loss/ministep2"] > 0 for r in plain["records"])


@pytest.mark.parametrize("method", METHODS)
def test_overlap_grad_reduce_trains_like_the_synchronous_reduction(runs, method):
    out_dir, results = runs
    _assert_same_metrics(results[method, "plain"], results[method, "overlap"],
                         trains_predictor=method == "pr2")
    expected = read_full_tensors(overlap_worker.checkpoint_dir(out_dir, method, "plain"))
    got = read_full_tensors(overlap_worker.checkpoint_dir(out_dir, method, "overlap"))
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in floats)
    for key in floats:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, k=key: f"{k}: {m}")


NO_SAVE = {"train.save": None, "train.save_interval": 0}
VARIANTS = {
    # the schedule starts each chunk's reduction itself (``grad_sync_func``, as Megatron-LM's
    # ``--align-grad-reduce``)
    "pp2_vpp2": {"parallel.pipeline_model_parallel_size": 2,
                 "parallel.virtual_pipeline_model_parallel_size": 2},
    # reduce-scatter into the optimizer's shards
    "distributed_optimizer": {"train.use_distributed_optimizer": True},
    # W_p set from Adam's step, never trained: zero gradients in every step
    "optimizer_predictor": {"predictor.predictor": "optimizer"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_overlap_grad_reduce_variants_of_pr2(tmp_path, variant):
    """PR2 under other layouts and predictors: the same metrics with the option on and off."""
    results = run_distributed(overlap_worker.train_with_and_without_overlap, 2, ["pr2"],
                              str(tmp_path), {**VARIANTS[variant], **NO_SAVE})[0]
    _assert_same_metrics(results["pr2", "plain"], results["pr2", "overlap"],
                         trains_predictor=variant != "optimizer_predictor")
