"""Settings that contradict each other or the model, missing packages, and what only the launch
machine can tell (inputs, CUDA, GPU count, TransformerEngine, FP8)."""

from __future__ import annotations

import importlib.util
import os

from megatron_pr2.config import RunConfig
from megatron_pr2.launch.placement import Placement


def config_problems(cfg: RunConfig, spec, layout: Placement) -> list[str]:
    """Settings that contradict each other or the model."""
    problems = []
    if cfg.model.transformer_impl == "transformer_engine" and cfg.model.device == "cpu":
        problems.append("--transformer-impl transformer_engine cannot run with --device cpu")
    if cfg.rollout.max_new_tokens >= spec.max_position_embeddings:
        problems.append(f"--max-new-tokens {cfg.rollout.max_new_tokens} does not fit the model's "
                        f"max_position_embeddings {spec.max_position_embeddings}")
    if cfg.model.fp8_format:
        sizes = (("hidden_size", spec.hidden_size),
                 ("moe_intermediate_size / ETP", spec.moe_ffn_hidden_size // max(layout.etp, 1)))
        problems += [f"FP8 GEMMs need {name} divisible by 16, got {size}"
                     for name, size in sizes if size % 16]
    return problems


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def package_problems(cfg: RunConfig) -> list[str]:
    """Optional packages the run needs that are missing here (checked on any machine)."""
    needs = []
    if cfg.train.tensorboard_dir:
        needs.append(("tensorboard", "--tensorboard-dir"))
    if cfg.task.task == "math":
        needs.append(("math_verify", "--task math"))
    if cfg.rollout.rollout_engine == "sglang":
        needs.append(("requests", "--rollout-engine sglang"))
    return [f"{flag} needs the Python package {pkg!r}, which is not installed"
            for pkg, flag in needs if not _importable(pkg)]


def input_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """(flag, path) of every input file or directory the run reads (Hub names excluded)."""
    paths = [("--load", cfg.model.load), ("--data-path", cfg.task.data_path),
             ("--eval-data-path", cfg.task.eval_data_path)]
    tokenizer = cfg.task.tokenizer
    if tokenizer and (os.path.isabs(tokenizer) or tokenizer.startswith(".")):
        paths.append(("--tokenizer", tokenizer))
    return [(flag, path) for flag, path in paths if path]


def runtime_problems(cfg: RunConfig, gpus_per_node: int) -> list[str]:
    """What only the launch machine can tell: inputs, CUDA, GPU count, TransformerEngine, FP8."""
    import torch

    problems = [f"{flag} {path} does not exist" for flag, path in input_paths(cfg)
                if not os.path.exists(path)]
    if cfg.model.device == "cpu":
        return problems
    if not torch.cuda.is_available():
        return [*problems, ("CUDA is not available on this machine (validate without GPUs by "
                            "leaving out --check-runtime, i.e. the script's --dry-run)")]
    if torch.cuda.device_count() < gpus_per_node:
        problems.append(f"GPUS_PER_NODE={gpus_per_node} but this node has "
                        f"{torch.cuda.device_count()} visible GPUs")
    if cfg.model.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
        problems.append("--transformer-impl transformer_engine: transformer_engine is not "
                        "importable (pip install 'megatron_pr2[gpu]')")
    capability = torch.cuda.get_device_capability()
    if cfg.model.fp8_format and capability < (8, 9):
        problems.append(f"--fp8-format {cfg.model.fp8_format} needs a GPU with compute "
                        f"capability >= 8.9 (H100, Ada); this one is {capability}")
    return problems
