"""``python -m megatron_pr2.train``: GRPO-family RL with none/R2/R3/PR2 routing (works under torchrun).

Example (one CPU process, the embedded tiny Qwen3-MoE and digit task)::

    python -m megatron_pr2.train --routing-method pr2 --train-iters 10 --warmup-sft-steps 150
"""

from __future__ import annotations

import logging
import sys

from megatron_pr2.config import RunConfig, parse_config
from megatron_pr2.platform import destroy_model_parallel

logger = logging.getLogger("megatron_pr2.train")


def run_training(cfg: RunConfig) -> None:
    """Build every part from ``cfg`` and run the RL loop (plus the optional warm-up)."""
    from megatron_pr2.training.components import build_components
    from megatron_pr2.training.loop import RLLoop
    from megatron_pr2.training.rollout_source import RolloutSource, make_engine, make_prompts
    from megatron_pr2.training.warmup import sft_warmup

    parts = build_components(cfg)
    try:
        prompts = make_prompts(cfg)
        if cfg.train.warmup_sft_steps:
            if cfg.task.task != "digits":
                raise ValueError("--warmup-sft-steps is for the embedded digit task")
            sft_warmup(parts.model, parts.actor.controller, prompts.task,
                       cfg.train.warmup_sft_steps, cfg.train.warmup_sft_lr)
        source = RolloutSource(cfg, make_engine(cfg, parts.hf_config), prompts)
        RLLoop(parts, source).run()
    finally:
        parts.actor.controller.close()
        destroy_model_parallel()


def configure_logging() -> None:
    """INFO for this project, WARNING for Megatron-Core (its INFO dumps every parameter name)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        cfg = parse_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_training(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
