"""Streaming write / grouped read of Megatron-Core ``torch_dist`` distributed checkpoints.

Writing: the checkpoint is produced with ``torch.distributed.checkpoint`` (the storage format
behind Megatron's ``torch_dist`` backend) through a planner whose ``resolve_data`` builds each
chunk on demand, and a writer that puts every chunk in its own file. The writer resolves and
writes items one at a time, so peak memory is one tensor plus its HF sources, never the model.
Megatron's ``metadata.json`` and ``common.pt`` complete the directory, so
``megatron.core.dist_checkpointing.load`` reads it like any checkpoint Megatron saved.

Reading: tensors are loaded in caller-chosen groups (one decoder layer at a time) through
``dist_checkpointing.load`` with whole-tensor ``ShardedTensor`` requests, which also reads
checkpoints the trainer saved under any parallel layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.sharding import DistKey, tp_chunks

logger = logging.getLogger(__name__)

CONTENT_METADATA_KEY = "content_metadata"  # where Megatron keeps content metadata in common.pt


@dataclasses.dataclass
class PlannedTensor:
    """One single-process Megatron tensor to write, produced on demand.

    Attributes:
        name: single-process Megatron name (for messages and progress).
        where: its distributed-checkpoint key and prepended-axis position.
        shape: its shape (without the prepended expert axis).
        dtype: the dtype to store.
        tp_axis, glu, tp: how to cut it into the chunks ranks of the target layout read.
        produce: returns the tensor as row blocks (their dim-0 concatenation); called once,
            when the tensor's first chunk is written.
        nbytes_in: source bytes read to produce it (for throughput reporting).
    """

    name: str
    where: DistKey
    shape: tuple[int, ...]
    dtype: torch.dtype
    tp_axis: int | None
    glu: bool
    tp: int
    produce: Callable[[], list[torch.Tensor]]
    nbytes_in: int = 0


class _LazySavePlanner(DefaultSavePlanner):
    """A save planner over chunks that do not exist until ``resolve_data`` asks for them."""

    def __init__(self, tensors: list[PlannedTensor], on_tensor_done: Callable[[PlannedTensor], None]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items: list[WriteItem] = []
        self._chunk_of: dict[tuple, tuple[int, tuple, tuple]] = {}
        self._tensors = tensors
        self._on_tensor_done = on_tensor_done
        for index, planned in enumerate(tensors):
            self._add_items(index, planned)
        self._current: tuple[int, list[torch.Tensor]] | None = None

    def _add_items(self, index: int, planned: PlannedTensor) -> None:
        chunks = tp_chunks(planned.shape, planned.tp_axis, planned.glu, planned.tp)
        global_shape = torch.Size(planned.where.global_shape(planned.shape))
        prepend = planned.where.prepend
        for offset, size in chunks:
            if prepend:
                offset, size = (prepend[0], *offset), (1, *size)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(size))
            self._items.append(WriteItem(
                index=MetadataIndex(planned.where.key, torch.Size(offset)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk,
                                            properties=TensorProperties(dtype=planned.dtype),
                                            size=global_shape),
            ))
            self._chunk_of[(planned.where.key, tuple(offset))] = (index, offset, size)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        index, offset, size = self._chunk_of[(write_item.index.fqn, tuple(write_item.index.offset))]
        planned = self._tensors[index]
        if self._current is None or self._current[0] != index:
            self._finish_current()
            blocks = [block.to(planned.dtype) for block in planned.produce()]
            shape = (sum(b.shape[0] for b in blocks), *blocks[0].shape[1:])
            if shape != tuple(planned.shape):
                raise ConversionError(f"{planned.name}: produced shape {shape}, expected "
                                      f"{planned.shape}")
            self._current = (index, blocks)
        if planned.where.prepend:
            offset, size = offset[1:], size[1:]
        piece = _rows(self._current[1], offset[0], size[0])
        for axis in range(1, len(offset)):
            piece = piece.narrow(axis, offset[axis], size[axis])
        piece = piece.contiguous()
        return piece.unsqueeze(0) if planned.where.prepend else piece

    def _finish_current(self) -> None:
        if self._current is not None:
            self._on_tensor_done(self._tensors[self._current[0]])
            self._current = None

    def close(self) -> None:
        self._finish_current()


def _rows(blocks: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Rows ``[start, start + length)`` of the dim-0 concatenation of ``blocks``; a view of a
    single block when the range lies inside one."""
    parts, base = [], 0
    for block in blocks:
        lo, hi = max(start, base), min(start + length, base + block.shape[0])
        if lo < hi:
            parts.append(block.narrow(0, lo - base, hi - lo))
        base += block.shape[0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def write_dist_checkpoint(out_dir: str, tensors: list[PlannedTensor], content_metadata: dict,
                          on_tensor_done: Callable[[PlannedTensor], None] = lambda t: None) -> None:
    """Write ``tensors`` as a Megatron ``torch_dist`` checkpoint, one tensor in memory at a time.

    Args:
        out_dir: an empty or new directory.
        tensors: the tensors in write order (keep each tensor's sources close together).
        content_metadata: JSON-like dict stored as Megatron content metadata (``common.pt``).
        on_tensor_done: progress callback, called after each tensor's chunks were handed over.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    os.makedirs(out_dir, exist_ok=True)
    if any(not name.startswith(".") for name in os.listdir(out_dir)):
        raise ConversionError(f"output directory {out_dir} is not empty")
    planner = _LazySavePlanner(tensors, on_tensor_done)
    writer = dcp.FileSystemWriter(out_dir, single_file_per_rank=False, thread_count=1,
                                  sync_files=False)
    try:
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as err:
        raise _first_cause(err) from err
    planner.close()
    torch.save({CONTENT_METADATA_KEY: content_metadata}, os.path.join(out_dir, "common.pt"))
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), out_dir)


def _first_cause(err: CheckpointException) -> BaseException:
    """The error a rank met inside a ``torch.distributed.checkpoint`` call (a
    ``ConversionError`` reading a source, an ``OSError`` writing), not the wrapper with its
    formatted tracebacks."""
    for cause, _ in err.failures.values():
        if isinstance(cause, Exception):
            return cause
    return ConversionError(str(err).splitlines()[0])


def ensure_process_group() -> None:
    """Megatron's checkpoint loader needs ``torch.distributed``; start a 1-process gloo group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def is_dist_checkpoint(path: str) -> bool:
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint

    return os.path.isdir(path) and check_is_distributed_checkpoint(path)


SAVE_DIR_MARKER = "latest_checkpointed_iteration.txt"  # what a trainer's --save holds


def not_a_checkpoint_reason(path: str) -> str | None:
    """Why ``path`` is not a Megatron distributed checkpoint directory (None when it is)."""
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isdir(path):
        return "is a file, not a checkpoint directory"
    if is_dist_checkpoint(path):
        return None
    if os.path.exists(os.path.join(path, SAVE_DIR_MARKER)):
        return ("is a trainer's --save directory, not one checkpoint: give one of its iter_* "
                "folders (a trainer resumes it with --save)")
    if os.path.exists(os.path.join(path, "config.json")):
        return ("is a Hugging Face checkpoint, not a Megatron one: convert it with "
                "tools/convert.py hf-to-megatron")
    return "is not a Megatron distributed checkpoint (no metadata.json)"


def require_dist_checkpoint(path: str) -> None:
    """Raise :class:`ConversionError` unless ``path`` is a Megatron distributed checkpoint."""
    reason = not_a_checkpoint_reason(path)
    if reason:
        raise ConversionError(f"{path} {reason}")


def check_storage_files(ckpt_dir: str) -> None:
    """Every ``.distcp`` file holds the bytes its ``.metadata`` promises (not truncated)."""
    metadata = dcp.FileSystemReader(ckpt_dir).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None or size < end:
            held = "is missing" if size is None else f"holds {size} bytes of {end}"
            raise ConversionError(f"{path} {held}: the checkpoint is truncated or incomplete")


def read_tensor_metadata(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (global_shape, dtype)}`` of every tensor in a ``torch_dist`` checkpoint."""
    from megatron.core import dist_checkpointing

    require_dist_checkpoint(ckpt_dir)
    metadata = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return {key: (tuple(sh.global_shape), sh.dtype) for key, sh in metadata.items()}


def read_content_metadata(ckpt_dir: str) -> dict:
    """The content metadata stored in ``common.pt`` (empty dict when there is none)."""
    from megatron.core.dist_checkpointing.serialization import load_content_metadata

    return load_content_metadata(ckpt_dir) or {}


def read_tensors(ckpt_dir: str, requests: Iterable[tuple[str, DistKey, tuple[int, ...], torch.dtype]]
                 ) -> dict[str, torch.Tensor]:
    """Load whole tensors ``(name, where, shape, dtype)`` from a ``torch_dist`` checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ensure_process_group()
    sharded = {}
    for name, where, shape, dtype in requests:
        data = torch.empty(shape, dtype=dtype)
        if where.prepend:
            index, count = where.prepend
            sharded[name] = ShardedTensor.from_rank_offsets(
                where.key, data, (0, index, count), replica_id=0, prepend_axis_num=1)
        else:
            sharded[name] = ShardedTensor.from_rank_offsets(where.key, data, replica_id=0)
    loaded = dist_checkpointing.load(sharded, ckpt_dir, validate_access_integrity=False)
    return {name: loaded[name] for name in sharded}
