"""Hugging Face checkpoint directories: read sharded safetensors lazily, write them in shards."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_pr2.convert.errors import ConversionError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
OPEN_SHARDS = 2
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt",
                    ".pth", ".h5", ".msgpack", ".gguf")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_hf_config(hf_dir: str) -> dict:
    """``config.json`` of an HF checkpoint dir, with transformers-5 field aliases normalised."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {hf_dir}")
    with open(path, encoding="utf-8") as handle:
        return normalise_hf_config(json.load(handle))


def normalise_hf_config(config: dict) -> dict:
    """Copy of an HF config dict with field aliases resolved.

    transformers >= 5 saves Qwen3-MoE's ``num_experts`` under its attribute-map name
    ``num_local_experts``; the Hub's configs use ``num_experts``.
    """
    config = dict(config)
    if "num_experts" not in config and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    return config


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
        self.files = self._weight_map()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._handles: dict[str, object] = {}
        self._read_headers()

    def _weight_map(self) -> dict[str, str]:
        index_path = os.path.join(self.hf_dir, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no weight_map")
        elif os.path.isfile(os.path.join(self.hf_dir, SINGLE_NAME)):
            weight_map = None
        else:
            raise ConversionError(
                f"no safetensors weights in {self.hf_dir}: expected {INDEX_NAME} (sharded) or "
                f"{SINGLE_NAME}"
            )
        if weight_map is None:
            with safe_open(os.path.join(self.hf_dir, SINGLE_NAME), framework="pt") as handle:
                return {name: SINGLE_NAME for name in handle.keys()}
        missing = sorted({f for f in weight_map.values()
                          if not os.path.isfile(os.path.join(self.hf_dir, f))})
        if missing:
            raise ConversionError(
                f"missing shard files in {self.hf_dir}: {', '.join(missing)} (listed in {INDEX_NAME})"
            )
        return dict(weight_map)

    def _read_headers(self) -> None:
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            handle = self._handle(file)
            present = set(handle.keys())
            absent = [n for n in names if n not in present]
            if absent:
                raise ConversionError(
                    f"{file} does not contain {', '.join(absent[:5])}"
                    f"{' ...' if len(absent) > 5 else ''} although the index says it does"
                )
            for name in names:
                tensor_slice = handle.get_slice(name)
                self.shapes[name] = tuple(tensor_slice.get_shape())
                self.dtypes[name] = _DTYPES.get(tensor_slice.get_dtype(), torch.float32)

    def _handle(self, file: str):
        """An open shard; at most ``OPEN_SHARDS`` stay mapped, so memory stays near one shard."""
        handle = self._handles.pop(file, None)
        if handle is None:
            handle = safe_open(os.path.join(self.hf_dir, file), framework="pt")
        self._handles[file] = handle   # most recently used last
        while len(self._handles) > OPEN_SHARDS:
            del self._handles[next(iter(self._handles))]
        return handle

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard."""
        if name not in self.files:
            raise ConversionError(f"{name} is not in the HF checkpoint {self.hf_dir}")
        return self._handle(self.files[name]).get_tensor(name)

    def nbytes(self, name: str) -> int:
        return _numel(self.shapes[name]) * self.dtypes[name].itemsize


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


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


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most ``max_shard_bytes`` (>= 1 tensor)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


class HfShardWriter:
    """Writes tensors into pre-planned safetensors shards; holds at most one shard in memory."""

    def __init__(self, out_dir: str, shards: list[list[str]]):
        self.out_dir = out_dir
        self.shards = shards
        total = len(shards)
        self.file_names = ([SINGLE_NAME] if total == 1 else
                           [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)])
        self._shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._total_bytes = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._shard_of:
            raise ConversionError(f"{name} was not planned for any output shard")
        shard = self._shard_of[name]
        buffer = self._buffers.setdefault(shard, {})
        buffer[name] = tensor.contiguous()
        if len(buffer) == len(self.shards[shard]):
            path = os.path.join(self.out_dir, self.file_names[shard])
            save_file(buffer, path, metadata={"format": "pt"})
            self._total_bytes += sum(t.numel() * t.element_size() for t in buffer.values())
            del self._buffers[shard]

    def close(self) -> None:
        """Check every shard was written and write the index (when sharded)."""
        if self._buffers:
            missing = [n for shard in self._buffers for n in self.shards[shard]
                       if n not in self._buffers[shard]]
            raise ConversionError(f"output shards incomplete; never received {missing[:5]}")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self._total_bytes},
                     "weight_map": {name: self.file_names[i] for name, i in self._shard_of.items()}}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)
