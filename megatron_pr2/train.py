"""``python -m megatron_pr2.train``: GRPO-family RL with none/R2/R3/PR2 routing (works under torchrun).

Example (one CPU process, the embedded tiny Qwen3-MoE and digit task)::

    python -m megatron_pr2.train --routing-method pr2 --train-iters 10 --warmup-sft-steps 150

Every fault ends with ``error:`` lines (:mod:`megatron_pr2.cli_errors`): exit status 2 for bad
input, found before the model is built; 1 for a fault at run time; 130 for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from megatron_pr2.cli_errors import debug_requested, run_reporting
from megatron_pr2.config import RunConfig
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.platform import destroy_model_parallel
from megatron_pr2.platform.process_tree import (
    die_with_parent_if_helper,
    helpers_tied_to_this_process,
)
from megatron_pr2.preflight.checks import check_model_settings, launch_rank
from megatron_pr2.preflight.inputs import check_inputs
from megatron_pr2.preflight.parsing import load_config, load_model_sizes
from megatron_pr2.preflight.problems import ValidationError
from megatron_pr2.rollout.engine import RolloutError
from megatron_pr2.training.checkpoint.checkpointing import (
    CheckpointError,
    complete_iterations,
)
from megatron_pr2.training.checkpoint.resume_config import ResumeConfigError
from megatron_pr2.training.checkpoint.save_lock import SaveDirLock, SaveDirLockedError
from megatron_pr2.training.nonfinite import NonFiniteError

# Inputs found unusable before anything is built: exit status 2. Data and tokenizer readers
# raise TypeError / OSError naming the file (and line).
BAD_INPUT = (ValueError, TypeError, OSError, ImportError)
# Faults the trainer detects and explains at run time: exit status 1. (RolloutError covers
# a pool without live servers and a failed weight sync; ConversionError a --load checkpoint
# that does not fit the model.)
RUN_FAULTS = (CheckpointError, NonFiniteError, ResumeConfigError, SaveDirLockedError,
              RolloutError, ConversionError)

logger = logging.getLogger("megatron_pr2.train")

# A process that multiprocessing spawns below the trainer imports this module first.
die_with_parent_if_helper()


def prepare_run(argv: list[str]):
    """Parse and check everything that can be checked before the model is built.

    Returns:
        ``(cfg, prompts)``: the validated config and the task's prompt source (data read,
        tokenizer loaded).

    Raises:
        ValueError (``ValidationError`` for several problems), TypeError, OSError: naming the
        bad input.
    """
    from megatron_pr2.training.rollout_source import make_prompts

    cfg = load_config(argv)
    check_inputs(cfg)
    check_model_settings(cfg)
    prompts = make_prompts(cfg)
    check_vocabulary(prompts, cfg)
    return cfg, prompts


def check_vocabulary(prompts, cfg: RunConfig) -> None:
    """Prompt token ids must fit the model: the tokenizer's vocabulary may not exceed it."""
    tokenizer = prompts.tokenizer
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    vocab = load_model_sizes(cfg.model.hf_config).vocab_size
    if size > vocab:
        raise ValidationError([
            (f"--tokenizer {cfg.task.tokenizer} has {size} tokens, more than the vocabulary "
             f"({vocab}) of --hf-config {cfg.model.hf_config}: prompt token ids would fall "
             "outside it; use the model's own tokenizer")])


def run_training(cfg: RunConfig, prompts=None) -> None:
    """Build every part from ``cfg`` and run the RL loop (plus the optional warm-up).

    Args:
        prompts: the task's prompt source (:func:`prepare_run`'s); default: made from ``cfg``.
    """
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.loop import RLLoop
    from megatron_pr2.training.rollout_source import (
        RolloutSource,
        data_parallel_coordinates,
        grid_layout_of,
        make_engine,
        make_prompts,
        stage_route_slots_of,
    )

    prompts = prompts or make_prompts(cfg)

    owns_save = bool(cfg.train.save) and launch_rank() == 0
    with SaveDirLock(cfg.train.save) if owns_save else contextlib.nullcontext():
        parts = build_components(cfg)
        try:
            _maybe_warm_up(cfg, parts, prompts)
            source = RolloutSource(cfg, make_engine(cfg, parts.hf_config), prompts,
                                   dp=data_parallel_coordinates(parts.groups),
                                   route_slots=stage_route_slots_of(parts),
                                   layout=grid_layout_of(parts))
            RLLoop(parts, source).run()
        finally:
            parts.actor.controller.close()
            destroy_model_parallel()


def _maybe_warm_up(cfg: RunConfig, parts, prompts) -> None:
    """The SFT warm-up, unless the run resumes (its checkpoint holds the warmed-up weights)."""
    from megatron_pr2.training.warmup import sft_warmup

    if not cfg.train.warmup_sft_steps:
        return
    if cfg.train.save and complete_iterations(cfg.train.save):
        logger.info("resuming from --save %s: the SFT warm-up is skipped (the checkpoint holds "
                    "its result)", cfg.train.save)
        return
    sft_warmup(parts.model, parts.actor.controller, prompts.task, cfg.train.warmup_sft_steps,
               cfg.train.warmup_sft_lr, max_consecutive_skips=cfg.train.max_consecutive_skips,
               groups=parts.groups, refresh=(parts.optimizer,))


def _reports_input_errors() -> bool:
    """Bad input is the same on every rank: one process per node reports it."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def configure_logging() -> None:
    """INFO for this project, WARNING for Megatron-Core (its INFO dumps every parameter name)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; return its exit status (0, 1 run-time fault, 2 bad input, 130 Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    configure_logging()
    prepared = []
    code = run_reporting(lambda: prepared.append(prepare_run(argv)), bad_input=BAD_INPUT,
                         debug=debug, speak=_reports_input_errors())
    if code:
        return code
    with helpers_tied_to_this_process():
        return run_reporting(lambda: run_training(*prepared[0]), faults=RUN_FAULTS, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
