"""``python -m megatron_pr2.train``: GRPO-family RL with none/R2/R3/PR2 routing (works under torchrun).

Example (one CPU process, the embedded tiny Qwen3-MoE and digit task)::

    python -m megatron_pr2.train --routing-method pr2 --train-iters 10 --warmup-sft-steps 150
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from megatron_pr2.config import RunConfig, parse_config
from megatron_pr2.launch.checks import check_model_settings
from megatron_pr2.launch.inputs import InputError, check_inputs
from megatron_pr2.launch.problems import ValidationError
from megatron_pr2.platform import destroy_model_parallel
from megatron_pr2.training.checkpointing import CheckpointError
from megatron_pr2.training.nonfinite import NonFiniteError
from megatron_pr2.training.resume_config import ResumeConfigError
from megatron_pr2.training.save_lock import SaveDirLock, SaveDirLockedError

# Faults the trainer detects and explains: reported as one ``error:`` line, exit status 1.
RUN_FAULTS = (CheckpointError, NonFiniteError, ResumeConfigError, SaveDirLockedError)

logger = logging.getLogger("megatron_pr2.train")


def run_training(cfg: RunConfig) -> None:
    """Build every part from ``cfg`` and run the RL loop (plus the optional warm-up)."""
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.loop import RLLoop
    from megatron_pr2.training.rollout_source import (
        RolloutSource,
        data_parallel_coordinates,
        make_engine,
        make_prompts,
        stage_route_slots_of,
    )
    from megatron_pr2.training.warmup import sft_warmup

    owns_save = bool(cfg.train.save) and _launch_rank() == 0
    with SaveDirLock(cfg.train.save) if owns_save else contextlib.nullcontext():
        parts = build_components(cfg)
        try:
            prompts = make_prompts(cfg)
            if cfg.train.warmup_sft_steps:
                if cfg.task.task != "digits":
                    raise ValueError("--warmup-sft-steps is for the embedded digit task")
                sft_warmup(parts.model, parts.actor.controller, prompts.task,
                           cfg.train.warmup_sft_steps, cfg.train.warmup_sft_lr,
                           max_consecutive_skips=cfg.train.max_consecutive_skips,
                           groups=parts.groups, refresh=(parts.optimizer,))
            source = RolloutSource(cfg, make_engine(cfg, parts.hf_config), prompts,
                                   dp=data_parallel_coordinates(parts.groups),
                                   route_slots=stage_route_slots_of(parts))
            RLLoop(parts, source).run()
        finally:
            parts.actor.controller.close()
            destroy_model_parallel()


def _launch_rank() -> int:
    """This process's global rank as torchrun sets it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def configure_logging() -> None:
    """INFO for this project, WARNING for Megatron-Core (its INFO dumps every parameter name)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        cfg = parse_config(argv)
        check_inputs(cfg)
        check_model_settings(cfg)
    except (InputError, ValidationError) as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        run_training(cfg)
    except RUN_FAULTS as err:
        logger.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
