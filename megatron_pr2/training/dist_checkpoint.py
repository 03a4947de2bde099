"""Model weights in Megatron-Core's distributed checkpoint format (``torch_dist``).

The format stores every tensor under its global key with its global shape, so a checkpoint
written under one parallel layout (TP/PP/EP/VPP) loads under any other: resharding happens on
load. Saving model chunks under ``chunk{i}`` keeps virtual-pipeline chunks apart in the returned
structure while their tensors keep global keys.
"""

from __future__ import annotations

import os
import tempfile

import torch
from megatron.core import dist_checkpointing


def _sharded_state_dict(chunks) -> dict:
    return {f"chunk{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def save_model_checkpoint(chunks, directory: str | os.PathLike) -> None:
    """Collectively save this rank's model chunks into ``directory`` (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks), str(directory))


def load_model_checkpoint(chunks, directory: str | os.PathLike, strict: bool = True) -> None:
    """Collectively load weights saved by :func:`save_model_checkpoint` under any layout."""
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FileNotFoundError(f"{directory} is not a Megatron distributed checkpoint "
                                "(no metadata.json / .metadata)")
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(directory))
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(state[f"chunk{i}"], strict=strict)


def read_full_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a ``torch_dist`` checkpoint as a full tensor keyed by global key.

    Needs no process group; meant for verification and inspection, not for large models.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "full.pt")
        dcp_to_torch_save(str(directory), path)
        state = torch.load(path, weights_only=False)
    return {k: v for k, v in _flatten(state).items() if isinstance(v, torch.Tensor)}


def _flatten(state, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
