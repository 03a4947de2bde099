"""Settings that contradict the model (checked by the trainer and the dry run alike), missing
packages, and what only the launch machine can tell (inputs, CUDA, GPU count, TransformerEngine,
FP8)."""

from __future__ import annotations

import importlib.util
import os

from megatron_pr2.config import RunConfig
from megatron_pr2.preflight.inputs import input_problems
from megatron_pr2.preflight.parsing import load_model_sizes
from megatron_pr2.preflight.placement import (
    Placement,
    model_division_problems,
    placement_problems,
)
from megatron_pr2.preflight.problems import ValidationError, collect
from megatron_pr2.preflight.urls import parse_sglang_urls, unreachable_servers


def model_setting_problems(cfg: RunConfig, spec) -> list[str]:
    """Run settings the model ``spec`` (a ``QwenMoeSizes``) cannot serve, one message each."""
    positions = spec.max_position_embeddings
    if cfg.rollout.max_new_tokens >= positions:
        return [(f"--max-new-tokens {cfg.rollout.max_new_tokens} does not fit the model's "
                 f"max_position_embeddings {positions} (prompt and response share them)")]
    return []


def launch_world_size() -> int:
    """The number of trainer processes as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    """This process's global rank as torchrun sets it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def layout_problems(cfg: RunConfig, spec, world_size: int) -> list[str]:
    """Why the parallel layout cannot run the model ``spec`` on ``world_size`` processes."""
    from megatron_pr2.rl.batch_plan import plan_batch

    world = placement_problems(cfg.parallel, world_size)
    if world:
        return [f"{problem}: launch a fitting number of processes (torchrun --nproc-per-node) "
                "or change the parallel sizes" for problem in world]
    layout = Placement.of(cfg.parallel, world_size)
    problems = model_division_problems(spec, layout, fp8=bool(cfg.model.fp8_format))
    collect(problems, plan_batch, cfg, layout.dp)
    return problems


def check_model_settings(cfg: RunConfig, world_size: int | None = None) -> None:
    """The trainer's check before it builds anything: the HF config parses, the run's settings
    fit the model and the parallel layout fits the launch's processes.

    Raises:
        ValidationError: one entry per problem.
    """
    spec = load_model_sizes(cfg.model.hf_config)
    world_size = launch_world_size() if world_size is None else world_size
    problems = [*model_setting_problems(cfg, spec), *layout_problems(cfg, spec, world_size),
                *package_problems(cfg)]
    if cfg.rollout.rollout_engine == "sglang" and not problems and launch_rank() == 0:
        # rank 0 alone talks to the servers; torchrun stops the other ranks when it exits
        problems = unreachable_servers(parse_sglang_urls(cfg.rollout.sglang_urls))
    if problems:
        raise ValidationError(problems)


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


def runtime_problems(cfg: RunConfig, gpus_per_node: int) -> list[str]:
    """What only the launch machine can tell: inputs, CUDA, GPU count, TransformerEngine, FP8."""
    import torch

    problems = input_problems(cfg)
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
