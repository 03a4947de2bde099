"""Build a Megatron-Core ``GPTModel`` for a Qwen-MoE HF config."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.router import TopKRouter

from megatron_pr2.models.divisibility import division_problems
from megatron_pr2.models.hf_config import (
    QwenMoeSizes,
    parse_hf_config,
    to_transformer_config,
)
from megatron_pr2.models.moe_options import check_routes_reach_experts
from megatron_pr2.models.spec import decoder_block_spec
from megatron_pr2.platform.device import module_to_device
from megatron_pr2.platform.distributed import ParallelConfig, process_groups
from megatron_pr2.platform.strict_device import guard_model_inputs


@dataclasses.dataclass
class ModelOptions:
    """How to build the model, beyond what the HF config fixes."""

    # the router class, or a callable that builds one like it (functools.partial of a class)
    router_class: Callable = TopKRouter
    use_transformer_engine: bool = False
    config_overrides: dict = dataclasses.field(default_factory=dict)
    # Megatron's process groups for the model; None: those initialize_model_parallel set up.
    pg_collection: ProcessGroupCollection | None = None


def build_model_chunks(hf_config, parallel=None, options: ModelOptions | None = None):
    """Build this rank's model chunks (one per virtual pipeline stage).

    Args:
        hf_config: path to an HF checkpoint dir / ``config.json``, a dict, or a parsed
            :class:`QwenMoeSizes`.
        parallel: :class:`megatron_pr2.platform.ParallelConfig`; the process groups (given in
            ``options`` or Megatron's initialised parallel state) must have the same sizes.
        options: router class, TransformerEngine, extra ``TransformerConfig`` fields, groups.

    Returns:
        ``(spec, config, chunks)``: the parsed HF spec, the ``TransformerConfig`` and a list of
        ``GPTModel`` chunks, on the compute device.
    """
    options = options or ModelOptions()
    spec = hf_config if isinstance(hf_config, QwenMoeSizes) else parse_hf_config(hf_config)
    _check_divisibility(spec, parallel or ParallelConfig(), bool(options.config_overrides.get("fp8")))
    config = to_transformer_config(spec, parallel, **options.config_overrides)
    check_routes_reach_experts(config)
    vpp = config.virtual_pipeline_model_parallel_size or 1
    groups = process_groups(options.pg_collection)
    pp_rank = groups.pp.rank()
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        block = decoder_block_spec(config, options.router_class, options.use_transformer_engine,
                                   vp_stage=stage, pp_rank=pp_rank)
        chunks.append(_on_device(GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=is_pp_first_stage(groups.pp) and is_vp_first_stage(stage, vpp),
            post_process=is_pp_last_stage(groups.pp) and is_vp_last_stage(stage, vpp),
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(spec.rope_theta),
            vp_stage=stage,
            pg_collection=groups,
        )))
    return spec, config, chunks


def _on_device(chunk):
    """``chunk`` moved to the compute device; in strict device mode its inputs are checked."""
    module_to_device(chunk)
    guard_model_inputs(chunk)
    return chunk


def build_model(hf_config, parallel=None, options: ModelOptions | None = None):
    """Build a single-chunk model (no virtual pipeline). Returns ``(spec, config, model)``."""
    spec, config, chunks = build_model_chunks(hf_config, parallel, options)
    if len(chunks) != 1:
        raise ValueError("build_model() builds one chunk; use build_model_chunks() with VPP")
    return spec, config, chunks[0]


def _check_divisibility(spec: QwenMoeSizes, parallel: ParallelConfig, fp8: bool) -> None:
    """Before ``TransformerConfig`` exists (its own FP8 checks need TransformerEngine)."""
    problems = division_problems(
        spec, tp=parallel.tensor_model_parallel_size, pp=parallel.pipeline_model_parallel_size,
        ep=parallel.expert_model_parallel_size, etp=parallel.expert_tensor_parallel_size,
        vpp=parallel.virtual_pipeline_model_parallel_size or 1, fp8=fp8)
    if problems:
        raise ValueError("; ".join(problems))


def unwrap_ddp(chunk):
    """The ``GPTModel`` inside the DDP (and ``Float16Module``) wrappers of a chunk."""
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk
