"""The LR / weight-decay schedule through Megatron's OptimizerParamScheduler, per parameter group.

Every group's LR (the PR2 predictor's, at ``lr_mult`` times the policy's, included) must follow the
closed form of linear warm-up from 0 then linear/cosine decay to ``min_lr``; weight decay must
reach exactly the groups with ``wd_mult > 0`` (AdamW shrinks those weights by ``1 - lr * wd``
on a zero-gradient step and leaves the others untouched).
"""

import math

import pytest
import torch

from megatron_pr2.routing.predictor import (
    predictor_optimizer_overrides,
    predictor_parameters,
)
from megatron_pr2.training.lr_schedule import ScheduledOptimizer, build_param_scheduler
from megatron_pr2.training.model_setup import (
    OptimizerOptions,
    build_optimizer,
    wrap_with_ddp,
)
from tests.megatron.test_router_replay import build

LR, MIN_LR, WD, MULT, WARMUP, DECAY = 1e-3, 1e-4, 0.1, 20.0, 3, 9


def closed_form(step: int, style: str, max_lr: float, min_lr: float) -> float:
    if step <= WARMUP:
        return max_lr * step / WARMUP
    if style == "constant":
        return max_lr
    if step > DECAY:
        return min_lr
    ratio = (step - WARMUP) / (DECAY - WARMUP)
    coeff = 1 - ratio if style == "linear" else 0.5 * (1 + math.cos(math.pi * ratio))
    return min_lr + coeff * (max_lr - min_lr)


def _scheduled(style: str):
    config, model = build(seed=3)
    ddp = wrap_with_ddp([model], config)
    options = OptimizerOptions(lr=LR, min_lr=MIN_LR, weight_decay=WD, clip_grad=1.0)
    overrides = predictor_optimizer_overrides(options.megatron_config(), MULT)
    optimizer = build_optimizer(ddp, options=options, config_overrides=overrides)
    scheduler = build_param_scheduler(optimizer, lr=LR, min_lr=MIN_LR, decay_style=style,
                                      warmup_steps=WARMUP, decay_steps=DECAY, weight_decay=WD)
    return ddp, model, ScheduledOptimizer(optimizer, scheduler)


def _zero_grad_step(ddp, optimizer):
    optimizer.zero_grad()
    ddp[0].zero_grad_buffer()
    for param in ddp[0].parameters():  # a gradient of exactly zero everywhere
        param.main_grad.zero_()
    success, _, _ = optimizer.step()
    assert success


@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_every_group_lr_follows_the_closed_form(megatron_single_process, style):
    ddp, model, optimizer = _scheduled(style)
    predictor_ids = {id(p) for p in predictor_parameters(model)}
    groups = [g for g in optimizer.param_groups if g["params"]]
    is_predictor = [any(id(p) in predictor_ids for p in g["params"]) for g in groups]
    assert any(is_predictor) and not all(is_predictor)
    for step in range(DECAY + 3):
        for group, predictor in zip(groups, is_predictor):
            mult = MULT if predictor else 1.0
            assert group["lr"] == pytest.approx(closed_form(step, style, LR * mult, MIN_LR * mult),
                                                rel=1e-9, abs=1e-15), (step, predictor)
        _zero_grad_step(ddp, optimizer)


def test_weight_decay_reaches_only_groups_with_wd_mult(megatron_single_process):
    ddp, model, optimizer = _scheduled("constant")
    for _ in range(WARMUP):  # to the full LR
        _zero_grad_step(ddp, optimizer)
    predictor_ids = {id(p) for p in predictor_parameters(model)}
    for group in optimizer.param_groups:
        expected = 0.0 if group["wd_mult"] == 0 else WD * group["wd_mult"]
        assert group["weight_decay"] == pytest.approx(expected)
        if any(id(p) in predictor_ids for p in group["params"]):
            assert group["weight_decay"] == 0.0
    for weight in predictor_parameters(model):  # zero-initialised: give it something to decay
        weight.data.fill_(0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _zero_grad_step(ddp, optimizer)
    decayed = 0
    for name, param in model.named_parameters():
        no_decay = param.ndim == 1 or id(param) in predictor_ids
        factor = 1.0 if no_decay else 1.0 - LR * WD
        torch.testing.assert_close(param.detach(), before[name] * factor, rtol=1e-6, atol=1e-9,
                                   msg=lambda m, n=name: f"{n}: {m}")
        decayed += not no_decay
    assert decayed > 0


def test_scheduler_state_travels_with_the_optimizer_state(megatron_single_process):
    ddp, _, optimizer = _scheduled("cosine")
    for _ in range(4):
        _zero_grad_step(ddp, optimizer)
    state = optimizer.scheduler.state_dict()
    _, _, fresh = _scheduled("cosine")
    fresh.scheduler.load_state_dict(state)
    assert fresh.scheduler.num_steps == 4
    fresh.scheduler.step(0)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx(
        [g["lr"] for g in optimizer.param_groups])
