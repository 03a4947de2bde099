"""Megatron's default (even) assignment of decoder layers to pipeline stages and virtual chunks."""

from __future__ import annotations


def stage_layer_numbers(num_layers: int, pp_size: int = 1, pp_rank: int = 0,
                        vp_size: int | None = None, vp_stage: int = 0) -> list[int]:
    """Global (1-based) layer numbers of one virtual chunk of a pipeline stage.

    For uneven layouts read the numbers from the built model instead (each decoder layer's
    ``layer_number``; see ``megatron_pr2.rollout.alignment.model_layer_numbers``).

    Raises:
        ValueError: the layers do not split evenly into ``pp_size x vp_size`` chunks.
    """
    chunks = pp_size * (vp_size or 1)
    if num_layers % chunks:
        raise ValueError(f"{num_layers} layers do not split evenly into {chunks} pipeline chunks")
    per_chunk = num_layers // chunks
    offset = vp_stage * (num_layers // (vp_size or 1)) + pp_rank * per_chunk
    return list(range(offset + 1, offset + per_chunk + 1))


def rank_layer_numbers(num_layers: int, pp_size: int, pp_rank: int, vp_size: int = 1) -> list[int]:
    """Global layer numbers held by pipeline rank ``pp_rank``, all its virtual chunks in order."""
    return [n for vp_stage in range(vp_size)
            for n in stage_layer_numbers(num_layers, pp_size, pp_rank, vp_size, vp_stage)]
