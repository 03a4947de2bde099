"""A bounded bucket of same-dtype tensors packed into one flat byte buffer.

The buffer is allocated once per bucket at its planned size; each tensor is cast and copied
into it as it is produced, so a sync never holds more than one bucket of converted weights.
The layout (tensors back to back, no padding, one dtype) is SGLang's ``flattened_bucket``.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class FlatBucket:
    """Named tensors of one dtype packed back to back in ``buffer`` (uint8).

    Args:
        capacity: bytes to allocate.
        dtype: every tensor is stored in this dtype.
        device: where the buffer lives (the transport's device).
    """

    capacity: int
    dtype: torch.dtype
    device: torch.device | str = "cpu"
    names: list[str] = dataclasses.field(default_factory=list)
    shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    used: int = 0

    def __post_init__(self):
        self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` (cast to the bucket dtype) to the end of the buffer."""
        nbytes = tensor.numel() * self.dtype.itemsize
        if self.used + nbytes > self.capacity:
            raise ValueError(f"bucket overflow adding {name}: {self.used} + {nbytes} bytes > "
                             f"capacity {self.capacity}")
        target = self.buffer[self.used:self.used + nbytes].view(self.dtype).view(tensor.shape)
        target.copy_(tensor)
        self.names.append(name)
        self.shapes.append(tuple(tensor.shape))
        self.used += nbytes

    @property
    def flat(self) -> torch.Tensor:
        """The filled part of the buffer (what goes on the wire)."""
        return self.buffer[:self.used]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views of the packed tensors, in insertion order."""
        out, offset = [], 0
        for name, shape in zip(self.names, self.shapes):
            numel = 1
            for dim in shape:
                numel *= dim
            nbytes = numel * self.dtype.itemsize
            out.append((name, self.buffer[offset:offset + nbytes].view(self.dtype).view(shape)))
            offset += nbytes
        return out

    def __len__(self) -> int:
        return len(self.names)
