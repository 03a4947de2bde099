"""Rollout: the engine protocol, the Sample contract, engines (in-process, SGLang), route transport.

Heavy modules (``inprocess``, ``sglang_client``, ``sglang_server``, ``alignment``) are imported
from their own submodules.
"""

from megatron_pr2.rollout.engine import (
    EngineHealth,
    EngineUnavailableError,
    MalformedResponseError,
    PartialRolloutError,
    RolloutEngine,
    RolloutError,
)
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import Sample, SampleStatus, SamplingParams

__all__ = [
    "EngineHealth", "EngineUnavailableError", "MalformedResponseError", "PartialRolloutError",
    "RolloutEngine", "RolloutError", "RouteShape", "Sample", "SampleStatus", "SamplingParams",
]
