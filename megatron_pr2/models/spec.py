"""The project's layer spec: local (CPU) or TransformerEngine modules, with an injectable router.

The router class enters Megatron-Core only through ``MoESubmodules(router=...)``; nothing in
Megatron is patched.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_pr2.models.norm import RMSNorm


class TransformerEngineMissingError(ImportError):
    """TransformerEngine was requested but is not installed."""


def _backend(use_transformer_engine: bool):
    if not use_transformer_engine:
        return LocalSpecProvider()
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import (
            TESpecProvider,
        )
    except ImportError as err:
        raise TransformerEngineMissingError(
            "TransformerEngine modules (grouped/FP8 experts) were requested but "
            "transformer_engine is not importable; install the 'gpu' extra "
            "(pip install 'megatron_pr2[gpu]') on a CUDA machine, or drop "
            "--transformer-impl transformer_engine / --fp8-format"
        ) from err
    return TESpecProvider()


def _norm(backend, use_transformer_engine: bool, for_qk: bool = False):
    if use_transformer_engine:
        return backend.layer_norm(rms_norm=True, for_qk=for_qk)
    return RMSNorm


def _moe_spec(backend, router_class, moe_grouped_gemm: bool) -> ModuleSpec:
    """The MoE block; experts are grouped GEMMs (TE ``GroupedLinear``) only with
    ``moe_grouped_gemm``, otherwise one MLP per local expert (``SequentialMLP``)."""
    dense_linears = MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
    )
    expert_module, expert_submodules = backend.grouped_mlp_modules(moe_grouped_gemm, False)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=expert_module, submodules=expert_submodules),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=dense_linears),
            router=router_class,
        ),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def _dense_mlp_spec(backend) -> ModuleSpec:
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()
        ),
    )


def layer_spec(is_moe: bool, qk_layernorm: bool, router_class=TopKRouter,
               use_transformer_engine: bool = False, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """One decoder layer: attention (+ optional q/k RMSNorm) and a dense MLP or an MoE block."""
    if moe_grouped_gemm and not use_transformer_engine:
        raise ValueError("moe_grouped_gemm needs the TransformerEngine spec "
                         "(--transformer-impl transformer_engine)")
    backend = _backend(use_transformer_engine)
    norm = _norm(backend, use_transformer_engine)
    qk_norm = _norm(backend, use_transformer_engine, for_qk=True) if qk_layernorm else IdentityOp
    mlp = (_moe_spec(backend, router_class, moe_grouped_gemm) if is_moe
           else _dense_mlp_spec(backend))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(config, router_class=TopKRouter, use_transformer_engine: bool = False,
                       vp_stage: int | None = None, pp_rank: int | None = None):
    """Block spec for this pipeline stage (and virtual stage): only its own layers, in order.

    ``config.moe_layer_freq`` (a 0/1 list, one entry per global layer) says which layers are MoE.
    """
    pattern = config.moe_layer_freq
    if not isinstance(pattern, list):
        pattern = [int(i % pattern == 0) for i in range(config.num_layers)]
    all_layers = [
        layer_spec(bool(is_moe), config.qk_layernorm, router_class, use_transformer_engine,
                   config.moe_grouped_gemm)
        for is_moe in pattern
    ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    backend = _backend(use_transformer_engine)
    return TransformerBlockSubmodules(
        layer_specs=all_layers[offset: offset + count],
        layer_norm=_norm(backend, use_transformer_engine),
    )
