"""Masked reductions shared by the RL losses and metrics."""

from __future__ import annotations

import torch


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless all given tensors have one shape (names appear in the error)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set (mask is bool or 0/1; unmasked values ignored)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over masked positions; 0 (not NaN) when the mask is empty."""
    return masked_sum(values, mask) / mask.to(values.dtype).sum().clamp(min=1.0)


def masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean of each row of ``[B, T]`` ``values`` over its masked positions (0 if empty)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum(dim=1) / mask.to(values.dtype).sum(dim=1).clamp(min=1.0)
