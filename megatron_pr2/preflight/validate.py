"""Validate a whole training configuration for a cluster layout, without launching anything.

``python -m megatron_pr2.preflight.validate --nnodes 2 --gpus-per-node 8 [--check-runtime]
-- <train flags>`` (``--print-layout`` only parses the flags and prints ``TP PP EP ETP`` for
shell scripts.)

Everything after ``--`` is what ``python -m megatron_pr2.train`` would receive. The checks are
arithmetic and parsing only (CPU, no model is built): the flags and the config parse, the HF
config parses, the parallel layout fits the world and divides the model, the rollout batch
splits into whole micro-batches on every data-parallel rank for every mini-step, the SGLang URLs
are well formed, a rollout cannot outlast ``--distributed-timeout-minutes``, the optional
packages the run uses are importable, and the weights, gradients
and Adam states fit a GPU. ``--check-runtime`` adds what only the launch machine can tell (CUDA,
GPU count, TransformerEngine, FP8 support, input files).

It prints a summary (layout, data-parallel size, micro-batches per mini-step, parameters and
memory per GPU) and exits 0, or prints one ``error: ...`` line per problem and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from megatron_pr2.config import RunConfig
from megatron_pr2.preflight.checks import (
    model_setting_problems,
    package_problems,
    runtime_problems,
)
from megatron_pr2.preflight.inputs import input_problems
from megatron_pr2.preflight.memory import (
    GIB,
    estimate_params,
    predictor_host_gib_per_gpu,
    training_state_bytes_per_param,
    weight_copy_bytes,
)
from megatron_pr2.preflight.parsing import load_config, load_model_sizes
from megatron_pr2.preflight.placement import (
    Placement,
    model_division_problems,
    placement_problems,
)
from megatron_pr2.preflight.problems import ValidationError, collect
from megatron_pr2.preflight.timeouts import host_timeout_problems
from megatron_pr2.preflight.urls import parse_sglang_urls
from megatron_pr2.rl.batch_plan import BatchPlan, plan_batch
from megatron_pr2.routing.methods import routing_method


@dataclasses.dataclass
class Report:
    """The outcome of a validation: summary lines and non-fatal notes."""

    lines: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _summary_lines(spec, layout: Placement, batch: BatchPlan, cfg: RunConfig) -> list[str]:
    per_chunk = spec.num_layers // (layout.pp * layout.vpp)
    chunks = f" ({layout.vpp} chunks of {per_chunk})" if layout.vpp > 1 else ""
    rollout = cfg.rollout
    return [
        (f"model: {spec.architecture}, {spec.num_layers} layers ({len(spec.moe_layer_indices)} "
         f"MoE), {spec.num_experts} experts top-{spec.top_k}, hidden {spec.hidden_size}, "
         f"vocab {spec.vocab_size}"),
        f"world: {layout.world_size} GPUs",
        (f"layout: TP={layout.tp} PP={layout.pp} VPP={layout.vpp} CP={layout.cp} EP={layout.ep} "
         f"ETP={layout.etp} sequence_parallel={layout.sequence_parallel}"),
        f"data parallel: DP={layout.dp} (dense), expert DP={layout.expert_dp}",
        f"layers per pipeline stage: {spec.num_layers // layout.pp}{chunks}",
        f"experts per EP rank: {spec.num_experts // layout.ep} of {spec.num_experts}",
        (f"rollout batch: {batch.samples} samples ({rollout.rollout_batch_prompts} prompts x "
         f"{rollout.n_samples_per_prompt}), {batch.samples_per_dp_rank} per DP rank"),
        f"mini-steps per rollout batch (off-policy window): {batch.ministeps}",
        (f"micro-batches per mini-step: {batch.microbatches_per_ministep} per DP rank "
         f"(micro-batch size {cfg.train.micro_batch_size}, {batch.samples_per_ministep} samples)"),
        (f"routing: {cfg.algo.routing_method}, loss {cfg.algo.policy_loss}, "
         f"predictor LR x{cfg.predictor.predictor_lr_mult:g}"),
    ]


def _add_rollout(report: Report, cfg: RunConfig, layout: Placement) -> None:
    if cfg.rollout.rollout_engine != "sglang":
        report.lines.append("rollout engine: in-process (on rank 0)")
        if cfg.rollout.sglang_urls:
            report.notes.append("--sglang-urls is ignored by --rollout-engine inprocess")
        return
    urls = parse_sglang_urls(cfg.rollout.sglang_urls)
    report.lines.append(f"rollout engine: SGLang, {len(urls)} server(s): {', '.join(urls)}")
    transport = cfg.rollout.weight_sync or "distributed"
    if transport != "disk":
        report.lines.append(
            f"weight sync: in memory ({transport}), {cfg.rollout.weight_sync_bucket_mb} MB "
            "buckets from each pipeline stage's first GPU"
            + (" over an NCCL group with the servers' GPUs" if transport == "distributed" else ""))
    elif cfg.train.save:
        report.lines.append(f"weight sync: disk, {os.path.join(cfg.train.save, 'weight_sync_hf')} "
                            "(must be readable by every SGLang server)")
    else:
        report.notes.append("--weight-sync disk without --save: weight sync goes through a "
                            "temporary directory, which SGLang servers on other hosts cannot read")


def _master_address_problems(cfg: RunConfig, layout: Placement, gpus_per_node: int) -> list[str]:
    """``--weight-sync-master-addr`` names one host, but with pipeline stages of whole nodes
    each stage's pushing rank is on another node (Megatron puts PP outermost)."""
    if not cfg.rollout.weight_sync_master_addr or layout.pp < 2:
        return []
    if layout.world_size // layout.pp < gpus_per_node:
        return []
    return [(f"--weight-sync-master-addr {cfg.rollout.weight_sync_master_addr} is one address, "
             f"but the {layout.pp} pipeline stages push from different nodes: leave it unset "
             "(each pushing rank offers its own address) or set MEGATRON_PR2_WEIGHT_SYNC_ADDR "
             "per node")]


def _add_memory(report: Report, cfg: RunConfig, spec, layout: Placement, batch: BatchPlan,
                gpus_per_node: int, gpu_memory_gib: float, prompt_tokens: int) -> None:
    method = routing_method(cfg.algo.routing_method, cfg.predictor.predictor)
    with_predictor = method.builds_predictor
    params = estimate_params(spec, layout, with_predictor)
    states, per_param = _training_state_gib(cfg, params, layout)
    predictor = (f" incl. {params.predictor_per_gpu / 1e6:.1f}M PR2 predictor"
                 if params.predictor_per_gpu else "")
    precision = ("bf16 + fp32 main weights" if cfg.train.bf16 else "fp32") + (
        ", distributed optimizer" if cfg.train.use_distributed_optimizer else "")
    report.lines += [
        f"parameters: {params.total / 1e9:.2f}B total, {params.active / 1e9:.2f}B active per token",
        f"parameters per GPU (fullest stage): {params.per_gpu / 1e9:.3f}B{predictor}",
        (f"weights+grads+Adam per GPU: {states:.1f} GiB of {gpu_memory_gib:g} GiB ({precision}, "
         f"{per_param:.1f} B/param; activations not included)"),
        _memory_by_node_count(cfg, spec, with_predictor, gpus_per_node),
    ]
    if states > gpu_memory_gib:
        raise ValidationError([
            (f"weights+grads+Adam need {states:.1f} GiB per GPU, more than the {gpu_memory_gib:g} "
             "GiB of a GPU: raise TP/PP/EP or add nodes")])
    if states > 0.75 * gpu_memory_gib:
        report.notes.append("weights+grads+Adam use over 75% of GPU memory: little room is left "
                            "for activations")
    if method.trains_predictor:
        host = predictor_host_gib_per_gpu(spec, layout, batch, cfg, prompt_tokens)
        report.lines.append(
            f"PR2 recorded predictor inputs: <= {host:.1f} GiB pinned host memory per GPU, "
            f"{host * gpus_per_node:.0f} GiB per node (--predictor-sample-ratio "
            f"{cfg.predictor.predictor_sample_ratio:g}, {prompt_tokens}-token prompts assumed)")
    _add_weight_copies(report, cfg, method, params, layout, gpus_per_node)
    if batch.microbatches_per_ministep < layout.pp:
        report.notes.append(f"only {batch.microbatches_per_ministep} micro-batches per mini-step "
                            f"for {layout.pp} pipeline stages: the pipeline will mostly idle")


def _training_state_gib(cfg: RunConfig, params, layout: Placement) -> tuple[float, float]:
    """Weights+grads+Adam GiB on the fullest GPU and bytes per parameter. The distributed
    optimizer's sharding is counted over the expert data-parallel size (the smaller one, so an
    upper bound for the dense part)."""
    per_param = training_state_bytes_per_param(cfg.train.bf16, cfg.train.use_distributed_optimizer,
                                               layout.expert_dp)
    return params.per_gpu * per_param / GIB, per_param


def _memory_by_node_count(cfg: RunConfig, spec, with_predictor: bool, gpus_per_node: int,
                          node_counts=(2, 4)) -> str:
    """Weights+grads+Adam per GPU of this precision and optimizer at 2 and 4 nodes."""
    figures = []
    for nodes in node_counts:
        if placement_problems(cfg.parallel, nodes * gpus_per_node):
            figures.append(f"{nodes} nodes: layout does not fit")
            continue
        layout = Placement.of(cfg.parallel, nodes * gpus_per_node)
        gib, _ = _training_state_gib(cfg, estimate_params(spec, layout, with_predictor), layout)
        figures.append(f"{nodes} nodes: {gib:.1f} GiB")
    return "weights+grads+Adam per GPU by node count: " + ", ".join(figures)


def _add_weight_copies(report: Report, cfg: RunConfig, method, params, layout: Placement,
                       gpus_per_node: int) -> None:
    """The pinned host memory of the method's weight copies (pr2-lookahead, current-route)."""
    bf16, distributed = cfg.train.bf16, cfg.train.use_distributed_optimizer
    for copies in method.weight_copies(bf16):
        gib = weight_copy_bytes(copies, params, layout, bf16, distributed) / GIB
        report.lines.append(
            f"{method.name}: {copies.count} weight copies, {gib:.1f} GiB pinned host memory per "
            f"GPU, {gib * gpus_per_node:.0f} GiB per node ({copies.note})")


def _add_runtime(report: Report, cfg: RunConfig, gpus_per_node: int, check_runtime: bool) -> None:
    if check_runtime:
        problems = runtime_problems(cfg, gpus_per_node)
        if problems:
            raise ValidationError(problems)
        report.lines.append("runtime: inputs, CUDA, GPUs, TransformerEngine and FP8 checked")
        return
    if cfg.model.transformer_impl == "transformer_engine":
        fp8 = f" with FP8 {cfg.model.fp8_format}" if cfg.model.fp8_format else ""
        report.lines.append(f"TransformerEngine{fp8}: required at launch (not checked in a dry "
                            "run)")
    report.notes += [f"{problem} here (checked at launch)" for problem in input_problems(cfg)]


def validate(train_argv: Sequence[str], nnodes: int, gpus_per_node: int, *,
             check_runtime: bool = False, gpu_memory_gib: float = 80.0,
             prompt_tokens: int = 512) -> Report:
    """Validate ``train_argv`` for ``nnodes x gpus_per_node`` GPUs; return the summary.

    Raises:
        ValidationError: one entry per problem found (unknown or mistyped flags included).
    """
    if nnodes < 1 or gpus_per_node < 1:
        raise ValidationError([(f"NNODES ({nnodes}) and GPUS_PER_NODE ({gpus_per_node}) must be "
                               ">= 1")])
    cfg = load_config(train_argv)
    spec = load_model_sizes(cfg.model.hf_config)
    world = nnodes * gpus_per_node
    layout = Placement.of(cfg.parallel, world)
    world_problems = placement_problems(cfg.parallel, world)
    problems = [*world_problems,
                *model_division_problems(spec, layout, fp8=bool(cfg.model.fp8_format)),
                *model_setting_problems(cfg, spec), *package_problems(cfg),
                *host_timeout_problems(cfg)]
    batch = None if world_problems else collect(problems, plan_batch, cfg, layout.dp)
    if cfg.rollout.rollout_engine == "sglang":
        collect(problems, parse_sglang_urls, cfg.rollout.sglang_urls)
    problems += _master_address_problems(cfg, layout, gpus_per_node)
    if problems:
        raise ValidationError(problems)
    report = Report(lines=_summary_lines(spec, layout, batch, cfg))
    _add_rollout(report, cfg, layout)
    _add_memory(report, cfg, spec, layout, batch, gpus_per_node, gpu_memory_gib, prompt_tokens)
    _add_runtime(report, cfg, gpus_per_node, check_runtime)
    return report


# ----------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_pr2.preflight.validate",
        description="Validate a megatron_pr2.train configuration for a cluster layout (no "
                    "launch). Training flags go after '--'.")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes of the cluster layout")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs on each node")
    parser.add_argument("--print-layout", action="store_true",
                        help="only parse the flags and print 'TP PP EP ETP' (for shell scripts)")
    parser.add_argument("--check-runtime", action="store_true",
                        help="also check input files, CUDA, GPU count, TransformerEngine and FP8")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU, for the memory estimate")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="prompt length assumed by the predictor memory estimate")
    return parser


def _print_layout(train_argv: Sequence[str]) -> None:
    parallel = load_config(train_argv).parallel
    print(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
          parallel.expert_model_parallel_size,
          parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    train_argv = argv[split + 1:]
    try:
        if args.print_layout:
            _print_layout(train_argv)
            return 0
        report = validate(train_argv, args.nnodes, args.gpus_per_node,
                          check_runtime=args.check_runtime, gpu_memory_gib=args.gpu_memory_gib,
                          prompt_tokens=args.prompt_tokens)
    except ValidationError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    print("\n".join([*report.lines, *(f"note: {note}" for note in report.notes),
                     "configuration OK"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
