"""Parameter counts and memory estimates per GPU, from the HF config alone (no model is built)."""

from __future__ import annotations

import dataclasses

from megatron_pr2.config import RunConfig
from megatron_pr2.models.pipeline_stages import rank_layer_numbers
from megatron_pr2.preflight.placement import Placement
from megatron_pr2.rl.batch_plan import BatchPlan

GIB = 1024**3


def model_weight_bytes(bf16: bool) -> int:
    """Bytes per model weight (what a method's host weight copies hold)."""
    return 2 if bf16 else 4


def training_state_bytes_per_param(bf16: bool, distributed_optimizer: bool,
                                   data_parallel: int) -> float:
    """Bytes per parameter of weights, grads and Adam state (``training/model_setup.py``).

    bf16 (2 B) or fp32 (4 B) weights and the fp32 grad buffer (4 B) stay whole on every rank; the
    fp32 main weights (bf16 only, 4 B) and Adam's two moments (8 B) are sharded over
    ``data_parallel`` ranks by the distributed optimizer.
    """
    replicated = model_weight_bytes(bf16) + 4
    sharded = (4 if bf16 else 0) + 8
    return replicated + sharded / (data_parallel if distributed_optimizer else 1)


@dataclasses.dataclass(frozen=True)
class ParamEstimate:
    """Parameter counts: the whole model (as Hugging Face counts it) and the fullest GPU."""

    total: int
    active: int  # per token: everything but the unselected experts
    per_gpu: int  # fullest pipeline stage, PR2 predictors included when used
    predictor_per_gpu: int
    experts_per_gpu: int = 0  # routed-expert weights of that stage (the rest is dense)


@dataclasses.dataclass(frozen=True)
class _LayerParams:
    tp_split: int  # attention, dense MLP, shared-expert linears: split over TP
    replicated: int  # norms, router, shared-expert gate: whole on every rank
    experts: int  # routed experts: split over EP x ETP
    predictor: int  # PR2 evolution predictor (E x d): whole on every rank


def _stage_layer_indices(spec, layout: Placement, pp_rank: int) -> list[int]:
    """0-based indices of the decoder layers pipeline rank ``pp_rank`` holds."""
    return [n - 1 for n in rank_layer_numbers(spec.num_layers, layout.pp, pp_rank, layout.vpp)]


def _layer_params(spec, layer: int) -> _LayerParams:
    d, hd = spec.hidden_size, spec.head_dim
    q_width, kv_width = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    attention = 2 * d * q_width + 2 * d * kv_width  # q, o; k, v
    if spec.qkv_bias:
        attention += q_width + 2 * kv_width
    norms = 2 * d + (2 * hd if spec.qk_layernorm else 0)
    if not spec.moe_layer_pattern[layer]:
        return _LayerParams(attention + 3 * d * spec.ffn_hidden_size, norms, 0, 0)
    shared = 3 * d * spec.shared_expert_intermediate_size
    shared_gate = d if spec.shared_expert_intermediate_size else 0
    router = spec.num_experts * d
    experts = spec.num_experts * 3 * d * spec.moe_ffn_hidden_size
    return _LayerParams(attention + shared, norms + router + shared_gate, experts, router)


def estimate_params(spec, layout: Placement, with_predictor: bool) -> ParamEstimate:
    """Count parameters from the HF config: in total and on the fullest GPU of ``layout``."""
    d = spec.hidden_size
    layers = [_layer_params(spec, i) for i in range(spec.num_layers)]
    embedding = spec.vocab_size * d
    body = sum(p.tp_split + p.replicated + p.experts for p in layers)
    total = embedding + (0 if spec.tie_word_embeddings else embedding) + d + body
    all_experts = sum(p.experts for p in layers)
    active = total - all_experts * (spec.num_experts - spec.top_k) // spec.num_experts
    per_gpu = predictor = experts = 0
    for rank in range(layout.pp):
        held = [layers[i] for i in _stage_layer_indices(spec, layout, rank)]
        stage_experts = sum(p.experts // (layout.ep * layout.etp) for p in held)
        count = stage_experts + sum(p.tp_split // layout.tp + p.replicated for p in held)
        if rank == 0:
            count += embedding // layout.tp
        if rank == layout.pp - 1:  # output layer (a second copy when tied under PP) + final norm
            tied_here = spec.tie_word_embeddings and layout.pp == 1
            count += (0 if tied_here else embedding // layout.tp) + d
        stage_predictor = sum(p.predictor for p in held) if with_predictor else 0
        if count + stage_predictor > per_gpu:
            per_gpu, predictor = count + stage_predictor, stage_predictor
            experts = stage_experts
    return ParamEstimate(total, active, per_gpu, predictor, experts)


def weight_copy_bytes(copies, params: ParamEstimate, layout: Placement, bf16: bool,
                      distributed_optimizer: bool) -> float:
    """Host memory per GPU of a method's ``WeightCopies`` (``routing/strategies/__init__.py``).

    Each copy holds the weights the GPU holds, or with ``updated_only`` those it updates: all it
    holds with the plain optimizer; with the distributed optimizer its slice, the dense weights
    over DP x CP and the experts over the expert data-parallel ranks.
    """
    weights = params.per_gpu
    if copies.updated_only and distributed_optimizer:
        dense = params.per_gpu - params.experts_per_gpu
        weights = dense / (layout.dp * layout.cp) + params.experts_per_gpu / layout.expert_dp
    return copies.count * weights * model_weight_bytes(bf16)


def predictor_host_gib_per_gpu(spec, layout: Placement, batch: BatchPlan, cfg: RunConfig,
                               prompt_tokens: int) -> float:
    """Pinned host memory for one rollout batch's recorded ``h_old, p_old`` (fp32), per GPU.

    Upper bound: every sample at ``prompt_tokens + --max-new-tokens`` tokens; tokens split over
    TP under sequence parallelism; the MoE layers of the fullest pipeline stage.
    """
    tokens = batch.samples_per_dp_rank * (prompt_tokens + cfg.rollout.max_new_tokens)
    if layout.sequence_parallel:
        tokens //= layout.tp
    moe_layers = max(sum(spec.moe_layer_pattern[i]
                         for i in _stage_layer_indices(spec, layout, rank))
                     for rank in range(layout.pp))
    row_bytes = 4 * (spec.hidden_size + spec.num_experts)
    return tokens * cfg.predictor.predictor_sample_ratio * moe_layers * row_bytes / GIB
