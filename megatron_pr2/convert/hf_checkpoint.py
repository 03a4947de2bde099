"""Hugging Face checkpoint directories: read sharded safetensors lazily, write them in shards."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.safetensors_io import (
    SafetensorsReader,
    SafetensorsStreamWriter,
)
from megatron_pr2.models.hf_config import load_hf_config

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt",
                    ".pth", ".h5", ".msgpack", ".gguf")


def read_hf_config(hf_dir: str) -> dict:
    """``config.json`` of an HF checkpoint dir (aliases resolved by ``load_hf_config``)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {hf_dir}")
    return load_hf_config(path)


class HfCheckpoint:
    """A checkpoint directory's tensors, indexed from safetensors headers; data read on demand.

    Attributes:
        hf_dir: the directory.
        config: its ``config.json``.
        files: tensor name -> shard file name.
        shapes / dtypes: tensor name -> shape / dtype, from the shard headers.
    """

    def __init__(self, hf_dir: str):
        if not os.path.isdir(hf_dir):
            raise ConversionError(f"HF checkpoint directory {hf_dir} does not exist")
        self.hf_dir = hf_dir
        self.config = read_hf_config(hf_dir)
        self._readers: dict[str, SafetensorsReader] = {}
        self.files = self._weight_map()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._read_headers()

    def _reader(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(os.path.join(self.hf_dir, file))
        return self._readers[file]

    def _weight_map(self) -> dict[str, str]:
        index_path = os.path.join(self.hf_dir, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no weight_map")
        elif os.path.isfile(os.path.join(self.hf_dir, SINGLE_NAME)):
            return {name: SINGLE_NAME for name in self._reader(SINGLE_NAME).entries}
        else:
            raise ConversionError(
                f"no safetensors weights in {self.hf_dir}: expected {INDEX_NAME} (sharded) or "
                f"{SINGLE_NAME}"
            )
        missing = sorted({f for f in weight_map.values()
                          if not os.path.isfile(os.path.join(self.hf_dir, f))})
        if missing:
            raise ConversionError(
                f"missing shard files in {self.hf_dir}: {', '.join(missing)} (listed in {INDEX_NAME})"
            )
        return dict(weight_map)

    def _read_headers(self) -> None:
        for name, file in self.files.items():
            reader = self._reader(file)
            if name not in reader.entries:
                raise ConversionError(f"{file} does not contain {name} although the index says it does")
            self.shapes[name] = reader.shape(name)
            self.dtypes[name] = reader.dtype(name)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (only that tensor's bytes are read)."""
        if name not in self.files:
            raise ConversionError(f"{name} is not in the HF checkpoint {self.hf_dir}")
        return self._reader(self.files[name]).read(name)

    def nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.dtypes[name].itemsize


def copy_hf_assets(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the non-weight files (tokenizer, generation config ...) except ``config.json``."""
    copied = []
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if not os.path.isfile(path) or name == "config.json" or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, os.path.join(dst_dir, name))
        copied.append(name)
    return copied


Entry = tuple[str, tuple[int, ...], torch.dtype]


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Group ``(name, shape, dtype)`` entries (in order) into shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    used = 0
    for entry in entries:
        size = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


class HfShardWriter:
    """Streams tensors into pre-planned safetensors shards (header first, then data in order).

    Tensors arriving ahead of their turn wait in memory; in plan order nothing is buffered.
    """

    def __init__(self, out_dir: str, shards: list[list[Entry]]):
        self.out_dir = out_dir
        self.shards = shards
        total = len(shards)
        self.file_names = ([SINGLE_NAME] if total == 1 else
                           [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)])
        self._shard_of = {entry[0]: i for i, entries in enumerate(shards) for entry in entries}
        self._writers: dict[int, SafetensorsStreamWriter] = {}
        self._waiting: dict[str, torch.Tensor] = {}
        self._done: set[int] = set()
        self.total_bytes = sum(math.prod(e[1]) * e[2].itemsize for es in shards for e in es)
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shard_of:
            raise ConversionError(f"{name} was not planned for any output shard")
        shard = self._shard_of[name]
        if shard not in self._writers:
            path = os.path.join(self.out_dir, self.file_names[shard])
            self._writers[shard] = SafetensorsStreamWriter(path, self.shards[shard], {"format": "pt"})
        writer = self._writers[shard]
        self._waiting[name] = tensor
        while writer.expected in self._waiting:
            next_name = writer.expected
            writer.write(next_name, self._waiting.pop(next_name))
        if writer.expected is None:
            writer.close()
            del self._writers[shard]
            self._done.add(shard)

    def close(self) -> None:
        """Check every shard was completed and write the index (when sharded)."""
        missing = [e[0] for i, es in enumerate(self.shards) if i not in self._done for e in es
                   if e[0] not in self._waiting]
        if missing or self._waiting:
            raise ConversionError(f"output shards incomplete; never received {missing[:5]}")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.file_names[i] for name, i in self._shard_of.items()}}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)
