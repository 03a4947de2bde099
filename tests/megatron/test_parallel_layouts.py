"""TP=2 (+SP), EP=2, PP=2 and DP=2 on 2 gloo processes equal the single-process run.

Loss, reduced gradients and weights after one Megatron optimizer step are compared tensor by
tensor (by global checkpoint key) against the same step on one process with the same weights.
"""

import os

import pytest
import torch

from megatron_pr2.training.checkpoint.model_weights import read_full_tensors
from tests.megatron import layout_worker
from tests.multiproc import run_distributed

LAYOUTS = {
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2": dict(expert_model_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
    "dp2": dict(),
}


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def reference(request, tmp_path_factory, initial_checkpoint):
    family = request.param
    init_dir = initial_checkpoint(family)
    out_dir = str(tmp_path_factory.mktemp(f"ref_{family}") / "single")
    (loss,) = run_distributed(layout_worker.train_step, 1, family, {}, init_dir, out_dir)
    return family, init_dir, loss, _read(out_dir)


def _read(out_dir):
    return {name: read_full_tensors(os.path.join(out_dir, name)) for name in ("grads", "after_step")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(reference, layout, tmp_path):
    family, init_dir, ref_loss, ref = reference
    losses = run_distributed(layout_worker.train_step, 2, family, LAYOUTS[layout], init_dir,
                             str(tmp_path))
    assert losses[0] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert losses[1] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    got = _read(str(tmp_path))
    for name in ("grads", "after_step"):
        assert got[name].keys() == ref[name].keys()
        for key, expected in ref[name].items():
            torch.testing.assert_close(got[name][key], expected, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
    router_grads = [v for k, v in ref["grads"].items() if "router.weight" in k]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)
