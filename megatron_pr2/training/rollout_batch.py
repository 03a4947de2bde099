"""Turn scored samples into the trainer's micro-batches (next-token tensors, masks, advantages)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megatron_pr2.platform.device import to_device
from megatron_pr2.rollout.alignment import MicroBatch, TokenParallel
from megatron_pr2.rollout.grid_layout import GridLayout, build_grids
from megatron_pr2.rollout.sample import Sample
from megatron_pr2.training.padding_mask import pad_token_mask


@dataclasses.dataclass
class TrainMicroBatch:
    """One micro-batch in Megatron's GPT convention (position ``s`` predicts token ``s + 1``).

    Attributes:
        microbatch_id: stable id within the rollout batch (route plans are keyed by it).
        grid: the padded token grid with its sample bookkeeping (host tensors).
        tokens: ``[B, S]`` the grid's token ids, on the compute device (like every tensor
            below: they feed the model and the loss).
        position_ids: ``[B, S]`` the grid's positions.
        labels: ``[B, S]`` next tokens (pad id at the end of each row).
        loss_mask: ``[B, S]`` bool, True where the label is a response token.
        advantages: ``[B, S]`` the label's sample advantage (0 off the mask).
        rollout_logp: ``[B, S]`` the engine's log-prob of the label (0 off the mask).
        old_logp: ``[B, S]`` filled by the old-log-prob pass.
        router_logp_old: ``[B, S, L, K]`` old-pass router log-probs at the dispatched routes,
            filled by the old-log-prob pass when RSPO is on.
    """

    microbatch_id: int
    grid: MicroBatch
    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    old_logp: torch.Tensor | None = None
    router_logp_old: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        return {"microbatch_id": self.microbatch_id, "tokens": self.tokens,
                "positions": self.position_ids, "labels": self.labels, "batch": self,
                "padding_mask": to_device(pad_token_mask(self.grid.sample_of))}


def _shift_left(grid: torch.Tensor, fill) -> torch.Tensor:
    shifted = torch.full_like(grid, fill)
    shifted[:, :-1] = grid[:, 1:]
    return shifted


def _label_rollout_logp(grid: MicroBatch, samples: Sequence[Sample],
                        mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` the engine's log-prob of each masked position's label (0 elsewhere, and for
    samples without rollout log-probs); one gather over the micro-batch's samples."""
    chosen = [samples[i] for i in grid.sample_indices]
    tables = [s.rollout_log_probs.float() if s.rollout_log_probs is not None
              else torch.zeros(s.response_length) for s in chosen]
    lengths = torch.tensor([t.numel() for t in tables])
    starts = torch.cumsum(lengths, 0) - lengths - torch.tensor([s.prompt_length for s in chosen])
    slot = _shift_left(grid.sample_of, -1)[mask]
    label_position = _shift_left(grid.token_of, -1)[mask]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = torch.cat(tables)[starts[slot] + label_position]
    return out


def to_train_microbatch(grid: MicroBatch, samples: Sequence[Sample], advantages: torch.Tensor,
                        microbatch_id: int, pad_token_id: int) -> TrainMicroBatch:
    """Next-token tensors of one padded micro-batch on the compute device; ``advantages`` is
    per sample (host)."""
    if grid.token_format != "bshd":
        raise ValueError("the RL trainer uses padded (bshd) micro-batches")
    labels = _shift_left(grid.tokens, pad_token_id)
    loss_mask = _shift_left(grid.response_mask, False)
    owner = _shift_left(grid.sample_of, -1).clamp(min=0)
    index = torch.tensor(grid.sample_indices)[owner]
    token_adv = torch.where(loss_mask, advantages[index], torch.zeros(()))
    rollout_logp = _label_rollout_logp(grid, samples, loss_mask)
    return TrainMicroBatch(microbatch_id, grid, *(to_device(t) for t in (
        grid.tokens, grid.position_ids, labels, loss_mask, token_adv.float(), rollout_logp)))


def needs_uniform_width(config) -> bool:
    """Whether every micro-batch must have one width (a Megatron ``TransformerConfig``).

    Megatron's pipeline schedule passes one tensor shape between stages, and the allgather
    dispatcher gathers equal token counts from every expert-parallel rank (which hold different
    data-parallel micro-batches). Otherwise (PP=1 and alltoall, or EP=1) each micro-batch is only
    as wide as its own longest sample.
    """
    if config.pipeline_model_parallel_size > 1:
        return True
    return config.moe_token_dispatcher_type == "allgather" and config.expert_model_parallel_size > 1


def build_train_microbatches(samples: Sequence[Sample], indices: Sequence[int],
                             advantages: torch.Tensor, micro_batch_size: int,
                             parallel: TokenParallel, pad_token_id: int,
                             uniform_width: bool = True) -> list[TrainMicroBatch]:
    """This rank's micro-batches over ``samples[indices]``, ids ``0 .. n-1`` in order.

    Each is padded to its own longest sample (rounded to ``parallel.sequence_multiple``), or with
    ``uniform_width`` (see :func:`needs_uniform_width`) to the longest sample of the whole rollout
    batch, which every rank holds, so all ranks agree on it.
    """
    grids = build_grids(samples, indices, GridLayout(micro_batch_size, parallel, uniform_width),
                        pad_token_id)
    return [to_train_microbatch(grid, samples, advantages, i, pad_token_id)
            for i, grid in enumerate(grids)]
