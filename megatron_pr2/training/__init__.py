"""Training: Megatron wiring, checkpoints, the actor and the RL loop."""
