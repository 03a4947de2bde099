"""Resuming under a new command line: which config changes are refused, which are applied.

The trainer state of a checkpoint holds the run's config (``RunConfig.to_dict()``). On resume the
new config is compared field by field with it:

* refused (the run would be meaningless): the model, the routing method, and the parallel layout
  (unless ``--allow-resharding``: Megatron's ``torch_dist`` format reshards on load; not with
  the distributed optimizer, whose ``dp_reshardable`` state reshards only over data-parallel
  ranks), the optimizer state's format (``--use-distributed-optimizer``, ``--bf16``), and the
  predictor learning-rate multiplier crossing 1 (the predictor then joins or leaves another
  optimizer parameter group, and the saved Adam state no longer matches);
* refused too: a checkpoint with PR2 predictor weights for a model without a predictor, or the
  reverse (:func:`check_predictor_presence`; the model and optimizer state would not match);
* applied and logged: everything else. Learning rates, intervals, logging and timeouts are the
  intended use; any other change (batching, loss options, seeds ...) is applied with a warning
  that the resumed run is no longer the same experiment.

The learning rates the new config sets take effect through :func:`configured_learning_rates`
and :func:`restore_learning_rates` around the optimizer-state load (which would otherwise bring
back the checkpoint's rates).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

REFUSED = {
    "model.hf_config": "the model",
    "model.transformer_impl": "the model's modules",
    "algo.routing_method": "the routing method",
    "train.use_distributed_optimizer": "the optimizer state's format: sharded or not",
    "train.bf16": "the optimizer state's format: fp32 main params beside bf16 weights or not",
}
LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
          "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
          "expert_tensor_parallel_size", "context_parallel_size", "sequence_parallel")
PARAMETER_LAYOUT = tuple(f for f in LAYOUT if f != "sequence_parallel")  # SP keeps grad buffers
SAFE_FIELDS = {
    "train.lr", "train.train_iters", "train.save_interval", "train.eval_interval",
    "train.eval_prompts", "train.tensorboard_dir", "train.log_jsonl", "train.keep_last",
    "train.max_consecutive_skips", "train.allow_resharding", "train.overlap_grad_reduce",
    "predictor.predictor_lr_mult",
    "rollout.rollout_timeout", "rollout.sglang_urls", "rollout.rollout_max_concurrency",
    "rollout.server_rejoin_interval",
    "parallel.distributed_timeout_minutes",
    "model.load", "model.device",
}
LR_KEYS = ("lr", "max_lr", "min_lr")


class ResumeConfigError(ValueError):
    """The new command line changes what the checkpoint's run is."""


def _flatten(config: dict) -> dict:
    return {f"{section}.{key}": value for section, fields in config.items()
            if isinstance(fields, dict) for key, value in fields.items()}


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """``{"section.field": (saved, current)}`` for every field both configs hold and differ."""
    old, new = _flatten(saved), _flatten(current)
    return {key: (old[key], new[key]) for key in sorted(old.keys() & new.keys())
            if old[key] != new[key]}


def _refusal(key: str, before, after, allow_resharding: bool,
             sharded_optimizer: bool) -> str | None:
    section, field = key.split(".", 1)
    if key in REFUSED:
        return REFUSED[key]
    if section == "parallel" and field in LAYOUT and not allow_resharding:
        return "the parallel layout (pass --allow-resharding to reshard the checkpoint)"
    if section == "parallel" and field in PARAMETER_LAYOUT and sharded_optimizer:
        return ("the parallel layout: the distributed optimizer's checkpointed state "
                "(dp_reshardable) reshards only over data-parallel ranks")
    if key == "predictor.predictor_lr_mult" and (before == 1.0) != (after == 1.0):
        return "the optimizer's parameter groups (the predictor LR multiplier crosses 1)"
    return None


def check_resume_config(saved: dict, current: dict, checkpoint: str,
                        allow_resharding: bool = False) -> dict[str, tuple]:
    """Refuse meaningless changes (all listed in one error), log the others; return them.

    Raises:
        ResumeConfigError: the model, routing method, optimizer state format or (without
            resharding, or with the distributed optimizer) the layout changed.
    """
    changes = config_changes(saved, current)
    sharded_optimizer = bool(_flatten(saved).get("train.use_distributed_optimizer"))
    refused = []
    for key, (before, after) in changes.items():
        reason = _refusal(key, before, after, allow_resharding, sharded_optimizer)
        if reason:
            refused.append(f"--{key.split('.', 1)[1].replace('_', '-')} {before!r} -> {after!r} "
                           f"({reason})")
    if refused:
        raise ResumeConfigError(
            f"cannot resume {checkpoint} with this command line; it changes: "
            + "; ".join(refused) + ". Resume with the original values or use a new --save")
    for key, (before, after) in changes.items():
        flag = "--" + key.split(".", 1)[1].replace("_", "-")
        if key in SAFE_FIELDS or key.startswith("parallel."):
            logger.info("resume: %s changed %r -> %r (applied)", flag, before, after)
        else:
            logger.warning("resume: %s changed %r -> %r (applied; the resumed run is no longer "
                           "the same experiment as the checkpoint's)", flag, before, after)
    return changes


def check_world_size(saved: int | None, current: int, checkpoint: str) -> None:
    """Refuse a resume on more ranks than wrote ``checkpoint`` (``saved`` None: not recorded).

    Each rank resumes its own trainer state (RNG streams, data position), so a rank the
    checkpoint has no state for cannot resume; fewer ranks can (a smaller data-parallel size).
    """
    if saved is not None and current > saved:
        raise ResumeConfigError(
            f"cannot resume {checkpoint} on {current} ranks: it was written by {saved} ranks and "
            f"holds a trainer state for each of them only. Resume on at most {saved} ranks "
            f"(the data-parallel size may shrink), or start a new run with --load of its weights")


def configured_learning_rates(optimizer) -> list[dict]:
    """The learning rates of each parameter group as the current config built them."""
    return [{k: group[k] for k in LR_KEYS if k in group} for group in optimizer.param_groups]


def restore_learning_rates(optimizer, configured: list[dict]) -> None:
    """Put the configured rates back after an optimizer-state load replaced them.

    The one place where a resumed run's learning rates are decided. With an LR scheduler
    (``optimizer.scheduler``, whose step count the load restored) each group's current ``lr``
    is the schedule's at that step, from the configured ``max_lr``/``min_lr``.
    """
    groups = optimizer.param_groups
    if len(groups) != len(configured):
        raise ResumeConfigError(f"the checkpoint's optimizer has {len(groups)} parameter groups, "
                                f"this run builds {len(configured)}")
    scheduler = getattr(optimizer, "scheduler", None)
    for group, rates in zip(groups, configured):
        if scheduler is not None:
            rates = {k: v for k, v in rates.items() if k != "lr"}
        changed = {k: (group.get(k), v) for k, v in rates.items() if group.get(k) != v}
        group.update(rates)
        if changed and "lr" in changed:
            logger.info("resume: learning rate %g -> %g (from the command line)",
                        changed["lr"][0], changed["lr"][1])
        if changed and "max_lr" in changed:
            logger.info("resume: peak learning rate %g -> %g (from the command line)",
                        changed["max_lr"][0], changed["max_lr"][1])
    if scheduler is not None:
        scheduler.step(increment=0)


def check_predictor_presence(checkpoint_keys, model_has_predictor: bool, checkpoint: str) -> None:
    """Refuse to resume a checkpoint whose PR2 predictor weights the model lacks, or the reverse.

    Args:
        checkpoint_keys: the tensor keys stored in the checkpoint.
        model_has_predictor: this run's routers hold ``W_p``.
        checkpoint: the checkpoint directory (for the message).

    Raises:
        ResumeConfigError: the checkpoint and the model disagree.
    """
    from megatron_pr2.convert.adapter import PREDICTOR_SUFFIX

    saved = any(key.endswith(PREDICTOR_SUFFIX) for key in checkpoint_keys)
    if saved == model_has_predictor:
        return
    if saved:
        problem = ("holds PR2 predictor weights, but this run's routing method builds no "
                   "predictor (checkpoints of older versions hold one for every method)")
        hint = "--load it as the starting weights (its predictor is then left out)"
    else:
        problem = "has no PR2 predictor weights, but this run's routing method builds a predictor"
        hint = "--load it as the starting weights (the predictor then starts at zero)"
    raise ResumeConfigError(f"cannot resume {checkpoint}: it {problem}. Resume with the routing "
                            f"method it was saved with, or {hint} with a new --save")


def check_checkpoint_predictor(checkpoint: str, config: dict) -> None:
    """:func:`check_predictor_presence` for a distributed checkpoint and a run config
    (``RunConfig.to_dict()``; the same answer on every rank, whatever layers it holds)."""
    from megatron_pr2.convert.dist_checkpoint import read_tensor_metadata
    from megatron_pr2.routing.methods import routing_method

    method = routing_method(config["algo"]["routing_method"], config["predictor"]["predictor"])
    check_predictor_presence(read_tensor_metadata(checkpoint), method.builds_predictor, checkpoint)
