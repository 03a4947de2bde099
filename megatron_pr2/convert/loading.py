"""Load a ``torch_dist`` checkpoint into model chunks built with any TP/PP/EP layout."""

from __future__ import annotations

import logging

import torch

from megatron_pr2.convert.adapter import PREDICTOR_SUFFIX
from megatron_pr2.convert.dist_checkpoint import (
    CONTENT_METADATA_KEY,
    read_tensor_metadata,
)
from megatron_pr2.convert.errors import ConversionError

logger = logging.getLogger(__name__)

# Model tensors a converted HF checkpoint cannot contain; they keep their initial values.
OPTIONAL_SUFFIXES = (PREDICTOR_SUFFIX,)


def _is_optional(key: str) -> bool:
    return key.endswith(OPTIONAL_SUFFIXES)


def _drop_extra_state(sharded: dict) -> None:
    """``_extra_state`` carries no weights (None for local layers, FP8 metadata under TE)."""
    for name in [n for n in sharded if n.endswith("._extra_state")]:
        del sharded[name]


def _check_against_checkpoint(sharded: dict, stored: dict, ckpt_dir: str) -> list[str]:
    """Refuse missing or mis-shaped tensors; return the optional entries absent from the ckpt."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    missing, absent_optional = [], []
    for name, item in sharded.items():
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            continue
        if item.key not in stored:
            (absent_optional if _is_optional(item.key) else missing).append(name)
            continue
        if (isinstance(item, ShardedTensor) and not item.allow_shape_mismatch
                and tuple(item.global_shape) != tuple(stored[item.key][0])):
            raise ConversionError(
                f"shape mismatch for {item.key}: checkpoint {ckpt_dir} has "
                f"{tuple(stored[item.key][0])}, the model expects {tuple(item.global_shape)}"
            )
    if missing:
        keys = sorted({sharded[n].key for n in missing})
        raise ConversionError(f"checkpoint {ckpt_dir} lacks {len(keys)} tensors the model has: "
                              f"{', '.join(keys[:6])}")
    return absent_optional


def _note_unused_predictor(chunks, stored: dict, ckpt_dir: str) -> None:
    """A checkpoint's PR2 predictor weights are left out on purpose when the model has no
    predictor (its routing method uses none): the policy's weights are what ``--load`` gives."""
    has_predictor = any(name.endswith(PREDICTOR_SUFFIX)
                        for chunk in chunks for name, _ in chunk.named_parameters())
    unused = [key for key in stored if _is_optional(key)]
    if unused and not has_predictor:
        logger.info("%s holds %d PR2 predictor tensors; this model has no predictor (its "
                    "routing method uses none), so they are not loaded", ckpt_dir, len(unused))


def load_megatron_checkpoint(model_chunks, ckpt_dir: str) -> dict:
    """Load weights into this rank's model chunks (one per virtual pipeline stage).

    Works for any TP/PP/EP/VPP layout: Megatron-Core reshards each tensor on load. Tensors
    that only exist in the trainer (the PR2 predictor) keep their initial values when the
    checkpoint does not have them (an HF-converted checkpoint); a checkpoint's predictor
    weights are skipped when the model has no predictor. Must be called on every rank.

    Args:
        model_chunks: a ``GPTModel`` or the list from ``build_model_chunks``.
        ckpt_dir: the ``torch_dist`` checkpoint directory.

    Returns:
        the checkpoint's content metadata (format, recorded parallel layout ...).

    Raises:
        ConversionError: not a distributed checkpoint, missing tensors, shape mismatches.
    """
    from megatron.core import dist_checkpointing

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    stored = read_tensor_metadata(ckpt_dir)
    sharded = {}
    skipped = []
    for index, chunk in enumerate(chunks):
        chunk_sharded = chunk.sharded_state_dict()
        _drop_extra_state(chunk_sharded)
        for name in _check_against_checkpoint(chunk_sharded, stored, ckpt_dir):
            skipped.append(chunk_sharded.pop(name).key)
        sharded[f"model{index}"] = chunk_sharded
    if skipped:
        logger.info("checkpoint has no %d optional tensors (e.g. %s); they keep their initial "
                    "values", len(skipped), skipped[0])
    _note_unused_predictor(chunks, stored, ckpt_dir)
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    content = loaded.pop(CONTENT_METADATA_KEY, None) or {}
    for index, chunk in enumerate(chunks):
        state = loaded[f"model{index}"]
        result = chunk.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys
                   if not k.endswith("._extra_state") and not _is_optional(k)]
        if missing or unexpected:
            raise ConversionError(f"loading {ckpt_dir} left model keys unset {missing[:5]} or "
                                  f"unexpected {unexpected[:5]}")
    return content


@torch.no_grad()
def model_state_for_export(model) -> dict[str, torch.Tensor]:
    """A single-process model's ``state_dict()`` without ``_extra_state`` (for the adapter)."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if not name.endswith("._extra_state") and tensor is not None}
