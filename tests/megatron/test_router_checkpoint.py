"""The evolution predictor as a model parameter: state dicts and Megatron optimizer groups."""

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.routing.predictor import (
    PREDICTOR_PARAM_ATTR,
    predictor_optimizer_overrides,
    predictor_parameters,
    set_group_lrs_to_max,
)
from tests.megatron.test_router_replay import build, tokens_and_positions


def test_predictor_is_zero_initialised_and_saved_with_the_model(megatron_single_process):
    config, model = build(seed=81)
    weights = predictor_parameters(model)
    assert len(weights) == 4 and all(w.shape == (8, config.hidden_size) for w in weights)
    assert all(torch.count_nonzero(w) == 0 for w in weights)
    assert all(getattr(w, PREDICTOR_PARAM_ATTR) for w in weights)
    for w in weights:
        w.data.normal_()
    state = model.state_dict()
    keys = [k for k in state if k.endswith("router.predictor.weight")]
    assert keys == [f"decoder.layers.{i}.mlp.router.predictor.weight" for i in range(4)]
    _, fresh = build(seed=82)
    fresh.load_state_dict(state)
    for a, b in zip(weights, predictor_parameters(fresh)):
        assert torch.equal(a, b)


def test_sharded_state_dict_holds_the_predictor_unsplit(megatron_single_process):
    config, model = build(seed=83)
    sharded = model.sharded_state_dict()
    entry = sharded["decoder.layers.2.mlp.router.predictor.weight"]
    assert isinstance(entry, ShardedTensor)
    assert entry.key == "decoder.layers.2.mlp.router.predictor.weight"
    assert tuple(entry.global_shape) == tuple(entry.local_shape) == (8, config.hidden_size)
    assert entry.axis_fragmentations == (1, 1)


def _ddp(config, model):
    return DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                              use_distributed_optimizer=False), model)


def test_megatron_optimizer_gives_the_predictor_its_own_lr_group(megatron_single_process):
    config, model = build(seed=84)
    ddp = _ddp(config, model)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.0,
                                 clip_grad=0.0, bf16=False, fp16=False)
    optimizer = get_megatron_optimizer(
        opt_config, [ddp], config_overrides=predictor_optimizer_overrides(opt_config, lr_mult=20.0))
    set_group_lrs_to_max(optimizer)
    predictor_ids = {id(p) for p in predictor_parameters(model)}
    groups = [g for g in optimizer.param_groups if any(id(p) in predictor_ids for p in g["params"])]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == predictor_ids
    assert groups[0]["lr"] == pytest.approx(2e-2) and groups[0]["min_lr"] == pytest.approx(2e-3)
    assert groups[0]["wd_mult"] == 0.0
    others = [g for g in optimizer.param_groups if g is not groups[0] and g["params"]]
    assert others and all(g["lr"] == pytest.approx(1e-3) for g in others)

    # one step where only the predictor loss has a gradient: Adam's first step moves each
    # predictor weight by lr * lr_mult * sign(grad) and leaves the policy where it was
    controller = RoutingController(ddp)
    tokens, positions = tokens_and_positions(seed=85)
    controller.begin_step("predict")
    controller.set_microbatch(0)
    with torch.no_grad():
        ddp(tokens, positions, None)
    plan = controller.end_step().routes
    for layer in model.decoder.layers:
        layer.mlp.router.weight.data.mul_(1.5)  # a drift for the predictor to learn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    controller.begin_step("replay", plan=plan, train_predictor=True)
    controller.set_microbatch(0)
    torch.autograd.backward(ddp(tokens, positions, None).sum() * 0.0)
    controller.end_step()
    finalize_model_grads([ddp])
    optimizer.step()
    for name, param in model.named_parameters():
        change = (param.detach() - before[name]).abs()
        if "predictor" in name:
            grad = param.main_grad
            moved = change[grad.abs() > 1e-6]
            assert moved.numel() > 0
            torch.testing.assert_close(moved, torch.full_like(moved, 2e-2), rtol=1e-2, atol=0)
        else:
            assert change.max() == 0, name
