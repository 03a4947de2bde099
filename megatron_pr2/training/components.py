"""Build what a run needs from its config: model, optimizer, actor, engine, task, logger."""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.models import ModelOptions, build_model_chunks, parse_hf_config
from megatron_pr2.models.hf_config import resolve_hf_config
from megatron_pr2.models.moe_options import (
    fp8_token_multiple,
    fusion_overrides,
    moe_overrides,
    precision_overrides,
)
from megatron_pr2.platform import initialize_model_parallel
from megatron_pr2.rl.losses import PolicyLossConfig
from megatron_pr2.rollout.alignment import TokenParallel
from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.routing.methods import routing_method
from megatron_pr2.routing.predictor import (
    PredictorConfig,
    predictor_optimizer_overrides,
)
from megatron_pr2.routing.router import ReplayRouter
from megatron_pr2.training.actor import PolicyActor
from megatron_pr2.training.lr_schedule import ScheduledOptimizer, build_param_scheduler
from megatron_pr2.training.model_setup import (
    OptimizerOptions,
    build_optimizer,
    wrap_with_ddp,
)
from megatron_pr2.training.nonfinite import NonFiniteGuard

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Components:
    """The parts of a run (one per process)."""

    cfg: RunConfig
    hf_config: dict
    spec: object
    model: list
    optimizer: object
    actor: PolicyActor
    token_parallel: TokenParallel
    groups: object  # the run's ProcessGroupCollection, handed to every part that communicates


def loss_config(cfg: RunConfig) -> PolicyLossConfig:
    algo = cfg.algo
    return PolicyLossConfig(
        loss_type=algo.policy_loss, eps_low=algo.clip_eps_low, eps_high=algo.clip_eps_high,
        tis=algo.tis, tis_cap=algo.tis_cap, icepop=algo.icepop, icepop_low=algo.icepop_low,
        icepop_high=algo.icepop_high, rspo=algo.rspo, rspo_gamma_min=algo.rspo_gamma_min,
    )


def _model_options(cfg: RunConfig, groups=None) -> ModelOptions:
    overrides = {}
    if cfg.model.recompute_granularity:
        overrides["recompute_granularity"] = cfg.model.recompute_granularity
        if cfg.model.recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
        else:
            overrides["recompute_modules"] = ["moe"]
    overrides.update(precision_overrides(cfg.train.bf16))
    overrides.update(moe_overrides(cfg.model, cfg.parallel))
    overrides.update(fusion_overrides(cfg.model))
    method = routing_method(cfg.algo.routing_method, cfg.predictor.predictor)
    router = functools.partial(ReplayRouter, use_predictor=method.builds_predictor)
    return ModelOptions(router_class=router,
                        use_transformer_engine=cfg.model.transformer_impl == "transformer_engine",
                        config_overrides=overrides, pg_collection=groups)


def _optimizer(cfg: RunConfig, model):
    train = cfg.train
    options = OptimizerOptions(lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
                               clip_grad=train.clip_grad, bf16=train.bf16,
                               use_distributed_optimizer=train.use_distributed_optimizer,
                               adam_beta2=train.adam_beta2)
    overrides = predictor_optimizer_overrides(options.megatron_config(),
                                              cfg.predictor.predictor_lr_mult)
    optimizer = build_optimizer(model, options=options, config_overrides=overrides)
    scheduler = build_param_scheduler(
        optimizer, lr=train.lr, min_lr=train.min_lr, decay_style=train.lr_decay_style,
        warmup_steps=train.lr_warmup_iters,
        decay_steps=train.lr_decay_steps(cfg.optimizer_steps), weight_decay=train.weight_decay)
    return ScheduledOptimizer(optimizer, scheduler)


def build_components(cfg: RunConfig) -> Components:
    """Initialise the process groups and build model, optimizer and actor for ``cfg``."""
    parallel = cfg.parallel
    groups = initialize_model_parallel(parallel, seed=cfg.train.seed, device=cfg.model.device,
                                       strict_device=cfg.model.strict_device)
    hf_config = resolve_hf_config(cfg.model.hf_config)
    spec = parse_hf_config(hf_config)
    _, config, chunks = build_model_chunks(spec, parallel, _model_options(cfg, groups))
    if cfg.model.load:
        from megatron_pr2.convert.loading import load_megatron_checkpoint

        load_megatron_checkpoint(chunks, cfg.model.load)
    model = wrap_with_ddp(chunks, config,
                          overlap_grad_reduce=cfg.train.overlap_grad_reduce,
                          use_distributed_optimizer=cfg.train.use_distributed_optimizer,
                          groups=groups)
    optimizer = _optimizer(cfg, model)
    predictor = PredictorConfig(loss=cfg.predictor.predictor_loss,
                                sample_ratio=cfg.predictor.predictor_sample_ratio,
                                lr_mult=cfg.predictor.predictor_lr_mult, seed=cfg.train.seed)
    controller = RoutingController(model, predictor)
    actor = PolicyActor(model, optimizer, loss_config(cfg), controller,
                        nonfinite=NonFiniteGuard(cfg.train.max_consecutive_skips), groups=groups)
    token_parallel = TokenParallel(
        tp_size=groups.tp.size(),
        tp_rank=groups.tp.rank(),
        sequence_parallel=parallel.sequence_parallel,
        token_multiple=fp8_token_multiple(cfg.model.fp8_format, cfg.model.fp8_recipe),
    )
    logger.info("model: %s, %d layers (%d MoE), %d experts top-%d; %.2fM parameters on rank %d",
                spec.architecture, spec.num_layers, len(spec.moe_layer_indices), spec.num_experts,
                spec.top_k, sum(p.numel() for c in chunks for p in c.parameters()) / 1e6,
                torch.distributed.get_rank())
    return Components(cfg, hf_config, spec, model, optimizer, actor, token_parallel, groups)
