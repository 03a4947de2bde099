"""A parallel configuration placed on a world of GPUs: its sizes, world divisibility and model
divisibility."""

from __future__ import annotations

import dataclasses

from megatron_pr2.preflight.parsing import import_models_quietly
from megatron_pr2.preflight.problems import ValidationError


@dataclasses.dataclass(frozen=True)
class Placement:
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
    def of(cls, parallel, world_size: int) -> Placement:
        """The layout of ``parallel`` (a ``ParallelConfig``) on ``world_size`` GPUs, unchecked."""
        return cls(world_size=world_size, tp=parallel.tensor_model_parallel_size,
                   pp=parallel.pipeline_model_parallel_size,
                   vpp=parallel.virtual_pipeline_model_parallel_size or 1,
                   ep=parallel.expert_model_parallel_size,
                   etp=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
                   cp=parallel.context_parallel_size,
                   sequence_parallel=parallel.sequence_parallel)


def placement_problems(parallel, world_size: int) -> list[str]:
    """Why ``parallel`` (a ``ParallelConfig``) cannot be placed on ``world_size`` GPUs (if so)."""
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


def plan_placement(parallel, world_size: int) -> Placement:
    """The checked layout of ``parallel`` on ``world_size`` GPUs.

    Raises:
        ValidationError: the world is empty, or not divisible by the model-parallel sizes.
    """
    problems = placement_problems(parallel, world_size)
    if problems:
        raise ValidationError(problems)
    return Placement.of(parallel, world_size)


def model_division_problems(spec, placement: Placement, fp8: bool = False) -> list[str]:
    """Every way ``placement`` fails to split the model ``spec`` (a ``QwenMoeSizes``) evenly
    (into FP8-sized GEMMs with ``fp8``).

    The builder's own rule (:func:`megatron_pr2.models.divisibility.division_problems`); sizes
    below 1 are skipped here (:func:`placement_problems` names them).
    """
    import_models_quietly()
    from megatron_pr2.models.divisibility import division_problems

    return division_problems(spec, tp=placement.tp, pp=placement.pp, ep=placement.ep,
                             etp=placement.etp, vpp=placement.vpp, fp8=fp8)
