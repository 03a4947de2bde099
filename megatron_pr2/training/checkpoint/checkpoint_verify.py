"""Is a trainer checkpoint directory complete? Cheap structural checks that name the bad file.

A checkpoint (``iter_NNNNNNN/``) is Megatron's ``torch_dist`` format (``metadata.json``,
``.metadata``, ``common.pt``, ``__*.distcp`` shards) plus ``trainer_state_rank{r}.pt`` per rank.
The checks read the two metadata files, ``common.pt`` and the rank's trainer state, and compare
each shard's size with the byte ranges the metadata assigns to it. They catch truncated,
missing and garbled files (a killed copy, a full disk, a partial rsync); they do not checksum
shard contents.
"""

from __future__ import annotations

import json
import os

import torch

TRAINER_STATE = "trainer_state_rank{rank}.pt"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or unreadable."""


def trainer_state_path(directory: str, rank: int) -> str:
    return os.path.join(directory, TRAINER_STATE.format(rank=rank))


def load_trainer_state(directory: str, rank: int) -> dict:
    """This rank's trainer state (plain types and tensors only: ``weights_only=True``)."""
    path = trainer_state_path(directory, rank)
    if not os.path.exists(path):
        raise CorruptCheckpointError(
            f"{path} is missing (was the checkpoint written with the same number of ranks?)")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError by cause
        raise CorruptCheckpointError(f"{path} is unreadable ({_short(err)})") from err
    if not isinstance(state, dict) or "iteration" not in state:
        raise CorruptCheckpointError(f"{path} holds no trainer state")
    return state


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_backend(directory: str) -> None:
    path = os.path.join(directory, "metadata.json")
    if not os.path.exists(path):
        raise CorruptCheckpointError(f"{path} is missing")
    try:
        with open(path, encoding="utf-8") as handle:
            backend = json.load(handle).get("sharded_backend")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path} is garbled ({_short(err)})") from err
    if backend != "torch_dist":
        raise CorruptCheckpointError(f"{path} names backend {backend!r}, expected 'torch_dist'")


def _shard_extents(directory: str) -> dict[str, int]:
    """Bytes each shard file must hold, from the checkpoint's ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(directory, ".metadata")
    if not os.path.exists(path):
        raise CorruptCheckpointError(f"{path} is missing")
    try:
        metadata = FileSystemReader(directory).read_metadata()
        extents: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = info.offset + info.length
            extents[info.relative_path] = max(extents.get(info.relative_path, 0), end)
    except Exception as err:  # unpickling garbage raises nearly anything
        raise CorruptCheckpointError(f"{path} is garbled ({_short(err)})") from err
    return extents


def _check_shards(directory: str) -> None:
    for name, needed in sorted(_shard_extents(directory).items()):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CorruptCheckpointError(f"{path} is missing")
        size = os.path.getsize(path)
        if size < needed:
            raise CorruptCheckpointError(f"{path} is truncated ({size} of {needed} bytes)")


def _check_common(directory: str) -> None:
    path = os.path.join(directory, "common.pt")
    if not os.path.exists(path):
        raise CorruptCheckpointError(f"{path} is missing")
    try:
        torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise CorruptCheckpointError(f"{path} is unreadable ({_short(err)})") from err


def verify_checkpoint(directory: str, rank: int) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first bad file of ``directory``."""
    if not os.path.isdir(directory):
        raise CorruptCheckpointError(f"{directory} is missing")
    _check_backend(directory)
    _check_shards(directory)
    _check_common(directory)
    load_trainer_state(directory, rank)
