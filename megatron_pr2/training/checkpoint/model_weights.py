"""Model weights in Megatron-Core's distributed checkpoint format (``torch_dist``).

Load them with :func:`megatron_pr2.convert.load_megatron_checkpoint` (any layout).

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

from megatron_pr2.models.builder import unwrap_ddp


def _sharded_state_dict(chunks) -> dict:
    return {f"chunk{i}": unwrap_ddp(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_model_checkpoint(chunks, directory: str | os.PathLike) -> None:
    """Collectively save this rank's model chunks into ``directory`` (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks), str(directory))


def read_full_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a ``torch_dist`` checkpoint as a full tensor keyed by global key.

    Needs no process group; meant for verification and inspection, not for large models.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "full.pt")
        dcp_to_torch_save(str(directory), path)
        state = torch.load(path, weights_only=True)
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
