"""megatron_pr2: Predictive Routing Replay for MoE RL on Megatron-Core."""

__version__ = "0.1.0"
