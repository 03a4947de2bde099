"""The optimizer's part of a trainer checkpoint, around Megatron's ``sharded_state_dict``.

Megatron's ``DistributedOptimizer`` state is written ``dp_reshardable`` (Megatron-LM's default):
one flat tensor per grad-buffer bucket, so a checkpoint loads at another data-parallel size but
not under another TP/PP/EP layout. Two gaps of Megatron-Core 0.16.1 with torch's ``Adam`` (the
optimizer it uses without TransformerEngine or Apex, on GPUs as on the host) are closed here:

* before a load, ``sharded_state_dict(is_loading=True)`` reads the step count from the inner
  optimizer's per-parameter state, which a fresh optimizer does not have yet (an
  ``AssertionError``): :func:`prepare_optimizer_for_load` allocates it through the optimizer's own
  ``load_state_dict`` (Megatron's allocation: shapes, dtypes, device);
* after a ``dp_reshardable`` load, every parameter's ``step`` is the pre-load counter (the load
  copies it back over the checkpoint's), in one tensor shared by all parameters that torch's
  ``Adam`` would increment once per parameter: :func:`finish_optimizer_load` sets the
  checkpoint's count, in a tensor per parameter.

The load also copies in place into views of fp32 model parameters, so it must run with autograd
off (``checkpointing`` loads under ``torch.no_grad()``).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_pr2.routing.strategies.optimizer_state import inner_optimizers

SHARDING_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _distributed(optimizer) -> list[DistributedOptimizer]:
    return [opt for opt in inner_optimizers(optimizer) if isinstance(opt, DistributedOptimizer)
            and not getattr(opt, "is_stub_optimizer", False)]


def _keeps_step_per_param(inner: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW count steps per parameter; fused TE/Apex Adam per parameter group."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def prepare_optimizer_for_load(optimizer) -> None:
    """Allocate the state of every distributed optimizer that has taken no step yet.

    The allocated values are placeholders the checkpoint overwrites; groups keep their
    hyper-parameters (the checkpoint's are loaded with the state).
    """
    for opt in _distributed(optimizer):
        if len(opt.optimizer.state) or not _keeps_step_per_param(opt.optimizer):
            continue
        groups = [{k: v for k, v in group.items() if k != "params"} | {"step": 0}
                  for group in opt.optimizer.state_dict()["param_groups"]]
        opt.load_state_dict({"optimizer": {"param_groups": groups}})


def finish_optimizer_load(optimizer) -> None:
    """Set every parameter's Adam ``step`` to the checkpoint's, each in its own tensor.

    The checkpoint's step count reaches the parameter groups (``group["step"]``), but the
    ``dp_reshardable`` load then copies the pre-load counter back over every parameter's
    ``step``, one tensor shared by all of them.
    """
    for opt in _distributed(optimizer):
        if not _keeps_step_per_param(opt.optimizer):
            continue
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state.get(param)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)
