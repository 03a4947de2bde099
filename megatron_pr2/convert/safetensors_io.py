"""Safetensors files read and written one tensor at a time, without memory-mapping.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range
of every tensor, optional ``__metadata__``) and the raw bytes. Reading a tensor with ``pread``
costs exactly that tensor's memory (a memory map keeps every touched page of the shard
resident), and writing the header first from a known plan lets tensors be streamed to disk as
they are produced instead of collecting a whole shard in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

from megatron_pr2.convert.errors import ConversionError

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_ALIGN = 8


class SafetensorsReader:
    """Header of one ``.safetensors`` file, and ``pread`` access to its tensors."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(handle.read(length))
            except (ValueError, UnicodeDecodeError) as err:
                raise ConversionError(f"{path} has a corrupt safetensors header: {err}") from err
            size = os.fstat(handle.fileno()).st_size
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + length
        self.entries = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            self.entries[name] = (DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                  tuple(entry["data_offsets"]))
        data_end = max((end for _, _, (_, end) in self.entries.values()), default=0)
        if self._data_start + data_end > size:
            raise ConversionError(f"{path} is truncated: its header describes {data_end} bytes of "
                                  f"tensor data, the file holds {size - self._data_start}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self.entries[name]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(f"{self.path}: byte range of {name} does not match its shape")
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as handle:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                count = os.preadv(handle.fileno(), [view[done:]], self._data_start + begin + done)
                if count == 0:
                    raise ConversionError(f"{self.path} is truncated (reading {name})")
                done += count
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensors (name, shape, dtype) are known in advance.

    The header goes first; then each tensor must be given, in the planned order, by
    :meth:`write`; :meth:`close` checks that all were written.
    """

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self._entries = list(entries)
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, shape, dtype in self._entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % _ALIGN)
        self._handle = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._handle.write(struct.pack("<Q", len(raw)) + raw)

    @property
    def expected(self) -> str | None:
        """Name of the next tensor to write (None when complete)."""
        return self._entries[self._next][0] if self._next < len(self._entries) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self._entries[self._next]
        if name != want_name:
            raise ConversionError(f"{self.path}: expected {want_name} next, got {name}")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(f"{self.path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"planned {tuple(shape)} {dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(data.numpy().data)
        self._next += 1

    def close(self) -> None:
        self._handle.close()
        if self.expected is not None:
            raise ConversionError(f"{self.path} is incomplete: {self.expected} was never written")
