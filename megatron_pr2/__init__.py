"""megatron_pr2: Predictive Routing Replay for MoE RL on Megatron-Core."""

from megatron_pr2.fallbacks import quiet_fallback_warnings

__version__ = "0.1.0"

# before any Megatron-Core import: its TE/Apex fallback notice becomes one INFO line
quiet_fallback_warnings()
