"""A parallel layout placed on a world of GPUs: sizes, world divisibility, model divisibility
and which layers each pipeline stage holds."""

from __future__ import annotations

import dataclasses

from megatron_pr2.launch.parsing import import_models_quietly
from megatron_pr2.launch.problems import ValidationError

TP_FLAG = "--tensor-model-parallel-size"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout placed on a world of GPUs."""

    world_size: int
    tp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    cp: int
    sequence_parallel: bool

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part: world / (TP * PP * CP)."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the experts: world / (ETP * EP * PP)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def of(cls, parallel, world_size: int) -> Layout:
        """The layout of ``parallel`` (a ``ParallelArgs``) on ``world_size`` GPUs, unchecked."""
        return cls(world_size=world_size, tp=parallel.tensor_model_parallel_size,
                   pp=parallel.pipeline_model_parallel_size,
                   vpp=parallel.virtual_pipeline_model_parallel_size or 1,
                   ep=parallel.expert_model_parallel_size,
                   etp=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
                   cp=parallel.context_parallel_size,
                   sequence_parallel=parallel.sequence_parallel)


def layout_problems(parallel, world_size: int) -> list[str]:
    """Why ``parallel`` (a ``ParallelArgs``) cannot be placed on ``world_size`` GPUs (if so)."""
    import_models_quietly()
    from megatron_pr2.platform.distributed import ParallelConfig

    if world_size < 1:
        return [f"world size must be >= 1, got {world_size}"]
    sizes = dataclasses.asdict(parallel)
    bad = [f"--{name.replace('_', '-')} must be >= 1, got {value}" for name, value in sizes.items()
           if isinstance(value, int) and not isinstance(value, bool) and value < 1]
    if bad:
        return bad
    try:
        ParallelConfig(**sizes).validate(world_size)
    except ValueError as err:
        return [str(err)]
    return []


def plan_layout(parallel, world_size: int) -> Layout:
    """The checked layout of ``parallel`` on ``world_size`` GPUs.

    Raises:
        ValidationError: the world is empty, or not divisible by the model-parallel sizes.
    """
    problems = layout_problems(parallel, world_size)
    if problems:
        raise ValidationError(problems)
    return Layout.of(parallel, world_size)


def model_division_problems(spec, layout: Layout) -> list[str]:
    """Every way ``layout`` fails to split the model ``spec`` (a ``QwenMoeSpec``) evenly.

    Sizes below 1 are skipped here (:func:`layout_problems` names them).
    """
    checks = [
        (spec.num_attention_heads, "num_attention_heads", layout.tp, TP_FLAG),
        (spec.num_key_value_heads, "num_key_value_heads", layout.tp, TP_FLAG),
        (spec.vocab_size, "vocab_size", layout.tp, TP_FLAG),
        (spec.num_experts, "num_experts", layout.ep, "--expert-model-parallel-size"),
        (spec.moe_ffn_hidden_size, "moe_intermediate_size", layout.etp,
         "--expert-tensor-parallel-size"),
        (spec.num_layers, "num_hidden_layers", layout.pp * layout.vpp,
         "--pipeline-model-parallel-size x --virtual-pipeline-model-parallel-size"),
    ]
    if not all(spec.moe_layer_pattern):
        checks.append((spec.ffn_hidden_size, "intermediate_size (dense layers)", layout.tp,
                       TP_FLAG))
    if spec.shared_expert_intermediate_size:
        checks.append((spec.shared_expert_intermediate_size, "shared_expert_intermediate_size",
                       layout.tp, TP_FLAG))
    return [f"{name}={value} is not divisible by {flag} = {size}"
            for value, name, size, flag in checks if size >= 1 and value % size]


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int) -> list[int]:
    """Global layer indices held by ``pp_rank`` (Megatron's even split, interleaved over VPP)."""
    per_chunk = num_layers // (pp * vpp)
    return [chunk * pp * per_chunk + pp_rank * per_chunk + i
            for chunk in range(vpp) for i in range(per_chunk)]
