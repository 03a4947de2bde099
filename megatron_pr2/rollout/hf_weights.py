"""Load Hugging Face checkpoint-named tensors into an in-memory ``transformers`` model.

Checkpoints (and the conversion adapters) name routed experts one by one
(``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``), while ``transformers`` >= 5 keeps them
fused per layer (``experts.gate_up_proj`` ``[E, 2I, H]`` = gate rows then up rows, and
``experts.down_proj`` ``[E, H, I]``). Older releases keep one module per expert, whose names equal
the checkpoint's; both are handled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

_EXPERT_NAME = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


class WeightNameError(KeyError):
    """A tensor name that the model does not have."""

    def __str__(self):
        return str(self.args[0])


def _copy(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ValueError(
            f"weight {name}: shape {tuple(source.shape)} does not match the model's "
            f"{tuple(target.shape)}"
        )
    target.copy_(source.to(device=target.device, dtype=target.dtype))


def _fused_expert_slice(params: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, str] | None:
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None
    prefix, expert, proj = match["prefix"], int(match["expert"]), match["proj"]
    if proj == "down_proj":
        fused = params.get(f"{prefix}.down_proj")
        return (fused[expert], f"{prefix}.down_proj[{expert}]") if fused is not None else None
    fused = params.get(f"{prefix}.gate_up_proj")
    if fused is None:
        return None
    if expert >= fused.shape[0]:
        raise WeightNameError(f"weight {name}: expert {expert} >= {fused.shape[0]} experts")
    half = fused.shape[1] // 2
    rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
    return fused[expert, rows], f"{prefix}.gate_up_proj[{expert}, {rows.start}:{rows.stop}]"


@torch.no_grad()
def load_hf_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Copy checkpoint-named tensors into ``model`` in place (any subset of its weights).

    Returns:
        The names loaded, in order.

    Raises:
        WeightNameError: a name the model has neither directly nor as a fused expert slice.
        ValueError: a shape mismatch.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    loaded = []
    for name, tensor in named_tensors:
        if name in params:
            _copy(params[name], tensor, name)
        else:
            target = _fused_expert_slice(params, name)
            if target is None:
                raise WeightNameError(
                    f"weight {name!r} is not a parameter of {type(model).__name__} (nor a routed "
                    "expert slice of its fused expert tensors)"
                )
            _copy(target[0], tensor, name)
        loaded.append(name)
    return loaded
