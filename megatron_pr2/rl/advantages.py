"""GRPO group-normalised advantages."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_g) / (std_g + eps)``.

    Args:
        rewards: ``[N]`` rewards, the ``group_size`` samples of each prompt contiguous (or already
            shaped ``[N / group_size, group_size]``).
        group_size: samples per prompt (>= 2).
        normalize_std: divide by the group's sample standard deviation (Bessel-corrected, as
            ``torch.std``). False gives Dr.GRPO's mean-centred advantages.
        eps: added to the std so constant-reward groups give 0, not NaN.

    Returns:
        ``[N]`` float advantages, in the order of ``rewards``.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    flat = rewards.reshape(-1).to(torch.float32)
    if flat.numel() % group_size:
        raise ValueError(f"{flat.numel()} rewards do not split into groups of {group_size}")
    groups = flat.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def zero_advantage_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of prompt groups whose rewards are all equal: their advantages are all 0, so they
    give the policy no gradient (GRPO's degenerate groups).

    Args:
        rewards: ``[N]`` rewards, the ``group_size`` samples of each prompt contiguous.
        group_size: samples per prompt.
    """
    groups = rewards.reshape(-1, group_size)
    return float((groups == groups[:, :1]).all(dim=1).float().mean())


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages: each sequence's advantage on its response tokens, 0 elsewhere.

    Args:
        advantages: ``[B]`` sequence advantages.
        response_mask: ``[B, T]`` bool or 0/1 mask of response tokens.

    Returns:
        ``[B, T]`` float tensor.
    """
    if advantages.dim() != 1 or response_mask.dim() != 2 or \
            advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(f"need advantages [B] and response_mask [B, T], got "
                         f"{tuple(advantages.shape)} and {tuple(response_mask.shape)}")
    return advantages.to(torch.float32)[:, None] * response_mask.to(torch.float32)
