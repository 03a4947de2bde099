"""The evolution predictor exists only for the routing methods that use it: the trainer's model
options, its optimizer, the weights it draws, and checkpoints with and without a predictor."""

import logging

import pytest
import torch

from megatron_pr2.config import parse_config
from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.models import build_model
from megatron_pr2.models.presets import preset
from megatron_pr2.platform.distributed import seed_model_parallel
from megatron_pr2.routing.predictor import predictor_parameters
from megatron_pr2.training.checkpoint.model_weights import save_model_checkpoint
from megatron_pr2.training.components import _model_options, _optimizer
from megatron_pr2.training.model_setup import wrap_with_ddp

# Written out by hand (not read from the table): the methods whose routers hold W_p.
WITH_PREDICTOR = {("pr2", "learned"), ("pr2", "optimizer"), ("pr2-engine", "learned")}
ALL_METHODS = [("none", "learned"), ("r2", "learned"), ("r3", "learned"), ("pr2", "learned"),
               ("pr2", "optimizer"), ("pr2-engine", "learned"), ("pr2-lookahead", "learned"),
               ("current-route", "learned")]


def _cfg(method: str, predictor: str = "learned", *extra: str):
    return parse_config(["--hf-config", "tiny-qwen3-moe", "--device", "cpu",
                         "--routing-method", method, "--predictor", predictor, *extra])


def _model(cfg, seed: int = 5):
    seed_model_parallel(seed)
    _, config, model = build_model(preset(cfg.model.hf_config), cfg.parallel, _model_options(cfg))
    return config, model


@pytest.mark.parametrize("method,predictor", ALL_METHODS)
def test_routers_hold_a_predictor_only_for_methods_that_use_it(megatron_single_process, method,
                                                               predictor):
    _, model = _model(_cfg(method, predictor))
    expected = (method, predictor) in WITH_PREDICTOR
    assert bool(predictor_parameters(model)) == expected
    assert any(k.endswith("router.predictor.weight") for k in model.state_dict()) == expected


def test_the_predictor_draws_no_random_numbers(megatron_single_process):
    """Same seed, with and without W_p: every shared weight and the RNG state afterwards agree,
    so leaving the predictor out does not move R2/R3/none onto another random stream."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    _, with_predictor = _model(_cfg("pr2"), seed=21)
    after_pr2 = torch.get_rng_state(), get_cuda_rng_tracker().get_states()
    _, without = _model(_cfg("r2"), seed=21)
    assert torch.equal(torch.get_rng_state(), after_pr2[0])
    tracker = get_cuda_rng_tracker().get_states()
    assert tracker.keys() == after_pr2[1].keys()
    assert all(torch.equal(tracker[name], after_pr2[1][name]) for name in tracker)
    shared = without.state_dict()
    full = with_predictor.state_dict()
    assert set(full) - set(shared) == {f"decoder.layers.{i}.mlp.router.predictor.weight"
                                       for i in range(4)}
    for name, tensor in shared.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, full[name]), name


def test_optimizer_has_a_predictor_group_only_with_a_predictor(megatron_single_process):
    groups = {}
    for method in ("pr2", "r2"):
        cfg = _cfg(method, "learned", "--predictor-lr-mult", "3")
        config, model = _model(cfg)
        optimizer = _optimizer(cfg, wrap_with_ddp([model], config))
        groups[method] = [(len(g["params"]), g["max_lr"]) for g in optimizer.param_groups]
    predictor_group = (4, pytest.approx(3 * 1e-4))  # 4 MoE layers, lr 1e-4 x 3
    assert predictor_group in groups["pr2"]
    assert predictor_group not in groups["r2"]
    assert len(groups["r2"]) == len(groups["pr2"]) - 1


def test_load_skips_a_checkpoints_predictor_or_starts_one_at_zero(megatron_single_process,
                                                                   tmp_path, caplog):
    _, pr2 = _model(_cfg("pr2"), seed=31)
    for weight in predictor_parameters(pr2):
        weight.data.normal_()
    save_model_checkpoint([pr2], tmp_path / "pr2")
    _, r2 = _model(_cfg("r2"), seed=32)
    with caplog.at_level(logging.INFO, logger="megatron_pr2"):
        load_megatron_checkpoint([r2], str(tmp_path / "pr2"))
    assert "holds 4 PR2 predictor tensors; this model has no predictor" in caplog.text
    saved = pr2.state_dict()
    for name, tensor in r2.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, saved[name]), name

    save_model_checkpoint([r2], tmp_path / "r2")
    _, pr2_again = _model(_cfg("pr2"), seed=33)
    load_megatron_checkpoint([pr2_again], str(tmp_path / "r2"))
    assert all(torch.count_nonzero(w) == 0 for w in predictor_parameters(pr2_again))
    loaded = pr2_again.state_dict()
    for name, tensor in r2.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, loaded[name]), name
