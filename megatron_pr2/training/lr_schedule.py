"""The learning-rate / weight-decay schedule: Megatron's ``OptimizerParamScheduler`` per optimizer step.

The schedule counts optimizer steps (an RL iteration takes ``--off-policy-window`` of them), as
Megatron-LM's ``--lr-warmup-iters`` / ``--lr-decay-iters`` count its optimizer iterations. The
scheduler sets every parameter group's ``lr`` from the group's own ``max_lr``/``min_lr`` (the
PR2 predictor's are the policy's times ``--predictor-lr-mult``) and its ``weight_decay`` to
``--weight-decay x wd_mult`` (0 for the predictor, norms and biases).
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_pr2.training.checkpoint.optimizer_checkpoint import SHARDING_METADATA

SCHEDULER_STATE_KEY = "param_scheduler"


def build_param_scheduler(optimizer, *, lr: float, min_lr: float, decay_style: str,
                          warmup_steps: int, decay_steps: int, weight_decay: float):
    """An ``OptimizerParamScheduler`` (linear warm-up from 0, then ``decay_style`` to ``min_lr``).

    Constructing it already applies step 0 to every group (LR and weight decay). The steps are
    checked once, by ``TrainArgs.check_lr_schedule`` (``RunConfig.validate``).
    """
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(decay_steps, warmup_steps + 1), lr_decay_style=decay_style,
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=1, wd_incr_style="constant",
    )


class ScheduledOptimizer:
    """A Megatron optimizer whose scheduler advances by one after every applied step.

    Everything else is delegated to the wrapped optimizer; the scheduler's state travels in the
    optimizer's (sharded) state dict under ``param_scheduler``, so checkpoints resume it.
    """

    def __init__(self, optimizer, scheduler: OptimizerParamScheduler):
        self.optimizer = optimizer
        self.scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self):
        """Megatron's ``(update_successful, grad_norm, num_zeros_in_grad)``."""
        success, grad_norm, num_zeros = self.optimizer.step()
        if success:
            self.scheduler.step(increment=1)
        return success, grad_norm, num_zeros

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False,
                           metadata: dict | None = None):
        """The optimizer's sharded state plus the scheduler's; the distributed optimizer's state
        is laid out ``dp_reshardable`` (Megatron-LM's default; the older
        ``fully_sharded_model_space`` default of Megatron-Core 0.16 cannot be saved)."""
        metadata = {**SHARDING_METADATA, **(metadata or {})}
        state = self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                                  metadata=metadata)
        state[SCHEDULER_STATE_KEY] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        scheduler_state = state.pop(SCHEDULER_STATE_KEY, None)
        self.optimizer.load_state_dict(state)
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
