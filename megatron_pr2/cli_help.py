"""``--help`` texts of the trainer's flags (one per config field) and of ``compare``'s flags.

Kept apart from the dataclasses so that a new config field adds one line here. Fixed-choice
fields list their values in :data:`TRAIN_CHOICES` (taken from the tables that define them where
one exists); the routing methods are described by their summaries in the methods table.
tests/unit/test_cli_help.py checks that every flag has a text and every choice list matches
what the config's validation accepts.
"""

from __future__ import annotations

import argparse

from megatron_pr2.models.moe_options import FP8_ALIGNMENT
from megatron_pr2.rl.losses import POLICY_LOSSES
from megatron_pr2.routing.methods import PREDICTORS, ROUTING_METHODS
from megatron_pr2.routing.predictor_loss import PREDICTOR_LOSSES

TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "transformer_impl": ("local", "transformer_engine"),
    "fp8_format": ("e4m3", "hybrid"),
    "fp8_recipe": tuple(FP8_ALIGNMENT),
    "moe_token_dispatcher_type": ("allgather", "alltoall"),
    "recompute_granularity": ("full", "selective"),
    "device": ("cpu", "cuda"),
    "rollout_engine": ("inprocess", "sglang"),
    "rollout_dtype": ("bf16", "fp32"),
    "weight_sync": ("tensor", "distributed", "disk"),
    "weight_sync_dtype": ("bf16", "fp32", "fp16"),
    "routing_method": tuple(ROUTING_METHODS),
    "policy_loss": tuple(POLICY_LOSSES),
    "predictor": PREDICTORS,
    "predictor_loss": tuple(PREDICTOR_LOSSES),
    "lr_decay_style": ("constant", "linear", "cosine"),
    "task": ("digits", "math"),
}
"""Values a fixed-choice trainer flag accepts (shown as its metavar)."""

TRAIN_HELP: dict[str, str] = {
    # model
    "hf_config": "HF model config: an embedded preset name, a checkpoint directory or a "
                 "config.json",
    "load": "Megatron checkpoint to start from (made by tools/convert.py hf-to-megatron)",
    "transformer_impl": "layer implementation: Megatron's local modules or TransformerEngine's",
    "fp8_format": "FP8 training format (TransformerEngine only; default: no FP8)",
    "fp8_recipe": "FP8 scaling recipe (Megatron-LM names)",
    "moe_token_dispatcher_type": "MoE token dispatcher (default: alltoall when EP > 1, else "
                                 "allgather)",
    "moe_grouped_gemm": "grouped expert GEMMs (TransformerEngine GroupedLinear)",
    "recompute_granularity": "activation recomputation (default: none)",
    "device": "compute device (default: cuda when available, else cpu)",
    "strict_device": "CPU backend: refuse host tensors at the model, loss and collectives, as "
                     "a GPU would",
    "moe_permute_fusion": "TransformerEngine's fused MoE token permute/unpermute (needs "
                          "--transformer-impl transformer_engine; replayed routes stay exact)",
    "apply_rope_fusion": "TransformerEngine's fused rotary embedding (needs --transformer-impl "
                         "transformer_engine)",
    "bias_swiglu_fusion": "Megatron's fused SwiGLU activation (bias_activation_fusion)",
    "gradient_accumulation_fusion": "accumulate weight gradients into main_grad inside the TE "
                                    "GEMMs (needs --transformer-impl transformer_engine)",
    # parallel
    "tensor_model_parallel_size": "tensor-parallel size (TP)",
    "pipeline_model_parallel_size": "pipeline-parallel size (PP)",
    "virtual_pipeline_model_parallel_size": "virtual pipeline stages per rank (interleaved "
                                            "schedule; default: off)",
    "expert_model_parallel_size": "expert-parallel size (EP)",
    "expert_tensor_parallel_size": "tensor-parallel size inside experts (default: TP)",
    "context_parallel_size": "context-parallel size (only 1 is supported by the RL trainer)",
    "sequence_parallel": "sequence parallelism over the TP group",
    "distributed_timeout_minutes": "timeout of every process group, the gloo host group "
                                   "included",
    # rollout
    "rollout_engine": "what generates rollouts: the in-process engine or SGLang servers",
    "sglang_urls": "comma-separated http://host:port of the SGLang servers",
    "rollout_dtype": "precision of the in-process rollout engine",
    "rollout_batch_prompts": "prompts per rollout batch",
    "n_samples_per_prompt": "samples per prompt (the GRPO group size)",
    "max_new_tokens": "most tokens generated per sample",
    "temperature": "sampling temperature of the rollouts",
    "rollout_timeout": "seconds per SGLang request (with the whole batch in flight, about the "
                       "batch's time)",
    "rollout_max_concurrency": "SGLang requests in flight at once (0: the whole batch)",
    "async_rollout": "generate the next rollout batch in the background while this one trains "
                     "(one-step off-policy; see docs/async_rollout.md)",
    "max_weight_staleness": "with --async-rollout: weight versions a trained batch may lag its "
                            "policy (1: rollout overlaps training; 0: no overlap)",
    "server_rejoin_interval": "seconds between /health probes of an evicted SGLang server "
                              "(0: never rejoins)",
    "weight_sync": "how weights reach the engine (default: tensor in-process, distributed for "
                   "SGLang)",
    "weight_sync_bucket_mb": "weight-sync bucket size in MB: the peak extra memory of a sync",
    "weight_sync_dtype": "dtype of the synced weights (default: the engine's)",
    "weight_sync_master_addr": "this host's address as the SGLang servers reach it "
                               "(distributed weight sync)",
    # algo
    "routing_method": "expert routing in the old pass and the mini-steps",
    "policy_loss": "policy loss: PPO clipped ratio or GSPO (sequence-level ratio)",
    "clip_eps_low": "lower clip range 1 - eps_low (default: the policy loss's own)",
    "clip_eps_high": "upper clip range 1 + eps_high (default: the policy loss's own)",
    "tis": "truncated importance sampling: weight tokens by min(pi_old/pi_rollout, --tis-cap)",
    "tis_cap": "cap of the --tis weight",
    "icepop": "IcePop: drop tokens whose pi_old/pi_rollout is outside [--icepop-low, "
              "--icepop-high]",
    "icepop_low": "lower bound of the --icepop ratio",
    "icepop_high": "upper bound of the --icepop ratio",
    "rspo": "RSPO: scale the ratio by the router-shift weight max(gamma, --rspo-gamma-min)",
    "rspo_gamma_min": "floor of the RSPO router-shift weight",
    "off_policy_window": "optimizer mini-steps per rollout batch",
    "normalize_advantage_std": "divide GRPO advantages by the group's standard deviation",
    "lookahead_scale": "pr2-lookahead: route mini-batch m at theta_0 + c (m-1) u with c this "
                       "scale",
    "drift_attribution_tokens": "tokens per step for the router-input vs router-weight drift "
                                "split (0: off)",
    "log_update_direction": "diagnostic: log how far the mini-step updates follow Adam's "
                            "predicted next step (keeps 3 fp32 copies of the rank's weights)",
    # predictor
    "predictor": "PR2's predictor W_p: learned, or set from the optimizer as c (m-1) u_r "
                 "(no learning)",
    "predictor_loss": "loss training W_p: KL to the post-step routing, KL of the drift, or L2",
    "predictor_lr_mult": "the predictor's learning rate as a multiple of --lr",
    "predictor_sample_ratio": "share of tokens the predictor loss samples, in (0, 1]",
    # train
    "train_iters": "RL iterations (rollout batches)",
    "micro_batch_size": "samples per micro-batch",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the decay",
    "lr_decay_style": "learning-rate schedule (Megatron's OptimizerParamScheduler)",
    "lr_warmup_iters": "optimizer steps of linear warm-up from 0",
    "lr_decay_iters": "optimizer steps the LR decays over (default: all of the run's)",
    "weight_decay": "AdamW weight decay (never on norms, biases or the PR2 predictor)",
    "adam_beta2": "Adam's beta2",
    "clip_grad": "global gradient-norm clip (0: off)",
    "bf16": "bf16 weights and compute (Float16Module), fp32 main weights and gradients",
    "use_distributed_optimizer": "shard main weights and Adam state over data-parallel ranks",
    "overlap_grad_reduce": "reduce each gradient bucket across data-parallel ranks as soon as "
                           "the last micro-batch's backward fills it (Megatron's DDP)",
    "seed": "random seed (sampling, data order, initialisation)",
    "save": "checkpoint directory; a run resumes from it automatically",
    "save_interval": "save every N iterations (0: never)",
    "eval_interval": "greedy evaluation every N iterations (0: never)",
    "eval_prompts": "prompts per greedy evaluation",
    "eval_before_train": "also evaluate the starting weights, logged as step 0",
    "tensorboard_dir": "TensorBoard log directory",
    "log_jsonl": "file receiving one JSON line of metrics per iteration",
    "warmup_sft_steps": "supervised warm-up steps before RL (embedded digit task only)",
    "warmup_sft_lr": "learning rate of the supervised warm-up",
    "keep_last": "keep only the N newest checkpoints (0: all)",
    "max_consecutive_skips": "stop after N optimizer steps in a row with a non-finite loss or "
                             "gradient",
    "allow_resharding": "resume under another parallel layout",
    # task
    "task": "what to train on: the embedded digit task or a math prompt+answer dataset",
    "data_path": "math problems: a JSONL or parquet file of prompts and answers",
    "task_min_len": "digit task: fewest digits per problem",
    "task_max_len": "digit task: most digits per problem",
    "partial_credit": "digit task: reward the share of matching answer positions (1 only for the "
                      "exact answer) instead of exact match only",
    "task_stratified": "digit task: problem i's operation and length cycle with i, so every batch "
                       "of (operations x lengths) prompts has the same difficulty mix",
    "tokenizer": "HF tokenizer directory (math task)",
    "eval_data_path": "math evaluation problems (else --eval-fraction of --data-path)",
    "eval_fraction": "math: share of --data-path held out (seeded) for evaluation",
    "apply_chat_template": "math: wrap text prompts as a user turn of the chat template",
}
"""One line per trainer config field (its flag is the field name with dashes)."""

COMPARE_HELP: dict[str, str] = {
    "out": "output directory (summaries, plots, TensorBoard logs, JSONL metrics)",
    "methods": "comma-separated routing methods to compare (see python -m megatron_pr2.train "
               "--help)",
    "iterations": "RL iterations per run",
    "group_size": "samples per prompt (the GRPO group size)",
    "off_policy_window": "optimizer mini-steps per rollout batch",
    "lr": "RL learning rate",
    "lookahead_scale": "pr2-lookahead's scale c",
    "predictor_lr_mult": "the PR2 predictor's learning rate as a multiple of --lr",
    "warmup_steps": "supervised warm-up steps, run once and shared by every run",
}
"""``compare`` flags whose ``add_argument`` gives no help of its own."""


def routing_methods_help() -> str:
    """Every routing method with its summary from the methods table."""
    return " | ".join(f"{name}: {method.summary}" for name, method in ROUTING_METHODS.items())


def train_flag_help(field_name: str, default) -> str:
    """The ``--help`` line of a trainer config field, ending with its default (unless the
    text explains the default itself)."""
    text = TRAIN_HELP.get(field_name)
    if text is None:
        return f"default: {default}"  # tests/unit/test_cli_help.py names fields without a text
    if field_name == "routing_method":
        text = f"{text}. {routing_methods_help()}"
    text = text if "default:" in text else f"{text} (default: {default})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def train_flag_metavar(field_name: str) -> str | None:
    """``{a,b,c}`` for a fixed-choice field, else ``None`` (argparse's own metavar)."""
    choices = TRAIN_CHOICES.get(field_name)
    return "{" + ",".join(choices) + "}" if choices else None


def describe_flags(parser: argparse.ArgumentParser, texts: dict[str, str]) -> None:
    """Give every option of ``parser`` without a help text its entry in ``texts`` (by dest)."""
    for action in parser._actions:  # argparse has no public accessor for its actions
        if action.help is None and action.dest in texts:
            action.help = texts[action.dest]
