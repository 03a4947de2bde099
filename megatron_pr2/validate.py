"""Validate a whole training configuration for a cluster layout, without launching anything.

``python -m megatron_pr2.validate --nnodes 2 --gpus-per-node 8 [--check-runtime] -- <train flags>``
(``--print-layout`` only parses the flags and prints ``TP PP EP ETP`` for shell scripts.)

Everything after ``--`` is what ``python -m megatron_pr2.train`` would receive. The checks are
arithmetic and parsing only (CPU, no model is built): the flags and the config parse, the HF
config parses, the parallel layout fits the world and divides the model, the rollout batch
splits into whole micro-batches on every data-parallel rank for every mini-step, the SGLang URLs
are well formed, the optional packages the run uses are importable, and the weights, gradients
and Adam states fit a GPU. ``--check-runtime`` adds what only the launch machine can tell (CUDA,
GPU count, TransformerEngine, FP8 support, input files).

It prints a summary (layout, data-parallel size, micro-batches per mini-step, parameters and
memory per GPU) and exits 0, or prints one ``error: ...`` line per problem and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from urllib.parse import urlsplit

import yaml

from megatron_pr2.config import RunConfig, build_parser, parse_config
from megatron_pr2.routing.methods import routing_method

GIB = 1024**3
# The trainer keeps fp32 parameters, fp32 gradients and Adam's two fp32 moments and does not use
# Megatron's distributed optimizer (megatron_pr2/training/model_setup.py): 16 bytes per parameter.
OPTIMIZER_STATE_BYTES_PER_PARAM = 16
TP_FLAG = "--tensor-model-parallel-size"


class ValidationError(ValueError):
    """The configuration cannot run; ``problems`` names each reason."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def _collect(problems: list[str], check, *args):
    """``check(*args)``, adding its problems to ``problems`` instead of raising."""
    try:
        return check(*args)
    except ValidationError as err:
        problems.extend(err.problems)
        return None


# ----------------------------------------------------------------------------------- flags
def check_flags(train_argv: Sequence[str]) -> None:
    """Parse the training flags alone; a bad flag or value raises one concise error.

    Raises:
        ValidationError: an unknown flag (with the closest known one) or a value of the wrong
            type, in argparse's words but without its usage text.
    """
    parser = build_parser()
    # argparse has no public list of its option strings
    known = [opt for action in parser._actions for opt in action.option_strings]

    def fail(message: str):
        flags = [arg.split("=")[0] for arg in train_argv if arg.startswith("--")]
        hints = [match for flag in flags if flag not in known
                 for match in difflib.get_close_matches(flag, known, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValidationError([f"{message}{hint}; see python -m megatron_pr2.train --help"])

    parser.error = fail
    parser.parse_args(list(train_argv))


def load_config(train_argv: Sequence[str]) -> RunConfig:
    """The trainer's own config parsing, with every failure as a :class:`ValidationError`."""
    check_flags(train_argv)
    try:
        return parse_config(list(train_argv))
    except yaml.YAMLError as err:
        raise ValidationError([f"--config is not valid YAML: {err}"]) from err
    except (ValueError, OSError) as err:
        raise ValidationError([str(err)]) from err


# ----------------------------------------------------------------------------------- model
def _import_quietly() -> None:
    """Import megatron_pr2.models/.platform, hiding Megatron-Core's warnings about absent TE."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron_pr2.models  # noqa: F401


def load_model_spec(hf_config: str):
    """Parse ``--hf-config`` (preset name, checkpoint dir or config.json) to a ``QwenMoeSpec``.

    Raises:
        ValidationError: the config is missing, malformed or unsupported.
    """
    _import_quietly()
    from megatron_pr2.models.hf_config import load_hf_config, parse_hf_config
    from megatron_pr2.models.presets import PRESETS

    try:
        raw = dict(PRESETS[hf_config]) if hf_config in PRESETS else load_hf_config(hf_config)
        return parse_hf_config(raw)
    except KeyError as err:
        raise ValidationError([f"--hf-config {hf_config}: missing field {err}"]) from err
    except (OSError, ValueError) as err:  # UnsupportedConfigError and JSON errors are ValueErrors
        raise ValidationError([f"--hf-config {hf_config}: {err}"]) from err


# ----------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout placed on a world of GPUs."""

    world_size: int
    tp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    cp: int
    sequence_parallel: bool

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part: world / (TP * PP * CP)."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the experts: world / (ETP * EP * PP)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def of(cls, parallel, world_size: int) -> Layout:
        """The layout of ``parallel`` (a ``ParallelArgs``) on ``world_size`` GPUs, unchecked."""
        return cls(world_size=world_size, tp=parallel.tensor_model_parallel_size,
                   pp=parallel.pipeline_model_parallel_size,
                   vpp=parallel.virtual_pipeline_model_parallel_size or 1,
                   ep=parallel.expert_model_parallel_size,
                   etp=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
                   cp=parallel.context_parallel_size,
                   sequence_parallel=parallel.sequence_parallel)


def layout_problems(parallel, world_size: int) -> list[str]:
    """Why ``parallel`` (a ``ParallelArgs``) cannot be placed on ``world_size`` GPUs (if so)."""
    _import_quietly()
    from megatron_pr2.platform.distributed import ParallelConfig

    if world_size < 1:
        return [f"world size must be >= 1, got {world_size}"]
    sizes = dataclasses.asdict(parallel)
    bad = [f"--{name.replace('_', '-')} must be >= 1, got {value}" for name, value in sizes.items()
           if isinstance(value, int) and not isinstance(value, bool) and value < 1]
    if bad:
        return bad
    try:
        ParallelConfig(**sizes).validate(world_size)
    except ValueError as err:
        return [str(err)]
    return []


def plan_layout(parallel, world_size: int) -> Layout:
    """The checked layout of ``parallel`` on ``world_size`` GPUs.

    Raises:
        ValidationError: the world is empty, or not divisible by the model-parallel sizes.
    """
    problems = layout_problems(parallel, world_size)
    if problems:
        raise ValidationError(problems)
    return Layout.of(parallel, world_size)


def model_division_problems(spec, layout: Layout) -> list[str]:
    """Every way ``layout`` fails to split the model ``spec`` (a ``QwenMoeSpec``) evenly.

    Sizes below 1 are skipped here (:func:`layout_problems` names them).
    """
    checks = [
        (spec.num_attention_heads, "num_attention_heads", layout.tp, TP_FLAG),
        (spec.num_key_value_heads, "num_key_value_heads", layout.tp, TP_FLAG),
        (spec.vocab_size, "vocab_size", layout.tp, TP_FLAG),
        (spec.num_experts, "num_experts", layout.ep, "--expert-model-parallel-size"),
        (spec.moe_ffn_hidden_size, "moe_intermediate_size", layout.etp,
         "--expert-tensor-parallel-size"),
        (spec.num_layers, "num_hidden_layers", layout.pp * layout.vpp,
         "--pipeline-model-parallel-size x --virtual-pipeline-model-parallel-size"),
    ]
    if not all(spec.moe_layer_pattern):
        checks.append((spec.ffn_hidden_size, "intermediate_size (dense layers)", layout.tp,
                       TP_FLAG))
    if spec.shared_expert_intermediate_size:
        checks.append((spec.shared_expert_intermediate_size, "shared_expert_intermediate_size",
                       layout.tp, TP_FLAG))
    return [f"{name}={value} is not divisible by {flag} = {size}"
            for value, name, size, flag in checks if size >= 1 and value % size]


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int) -> list[int]:
    """Global layer indices held by ``pp_rank`` (Megatron's even split, interleaved over VPP)."""
    per_chunk = num_layers // (pp * vpp)
    return [chunk * pp * per_chunk + pp_rank * per_chunk + i
            for chunk in range(vpp) for i in range(per_chunk)]


# ----------------------------------------------------------------------------------- batch
@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How a rollout batch is cut: samples -> data-parallel ranks -> mini-steps -> micro-batches."""

    samples: int
    samples_per_dp_rank: int
    samples_per_ministep: int  # per data-parallel rank
    microbatches_per_ministep: int  # per data-parallel rank
    ministeps: int


def plan_batch(cfg: RunConfig, layout: Layout) -> BatchPlan:
    """Split the rollout batch as the trainer does (``RLLoop._microbatches``).

    Raises:
        ValidationError: samples do not split into whole micro-batches on every rank and
            mini-step, or the interleaved pipeline schedule would refuse the micro-batch count.
    """
    rollout = cfg.rollout
    samples = rollout.rollout_batch_prompts * rollout.n_samples_per_prompt
    window, mbs = cfg.algo.off_policy_window, cfg.train.micro_batch_size
    unit = layout.dp * window * mbs
    if samples % unit:
        raise ValidationError([
            (f"a rollout batch of {samples} samples (--rollout-batch-prompts "
             f"{rollout.rollout_batch_prompts} x --n-samples-per-prompt "
             f"{rollout.n_samples_per_prompt}) is not divisible by DP x --off-policy-window x "
             f"--micro-batch-size = {layout.dp} x {window} x {mbs} = {unit}")])
    per_rank = samples // layout.dp
    per_step = per_rank // window
    plan = BatchPlan(samples, per_rank, per_step, per_step // mbs, window)
    if layout.vpp > 1 and plan.microbatches_per_ministep % layout.pp:
        raise ValidationError([
            (f"the interleaved pipeline schedule (--virtual-pipeline-model-parallel-size "
             f"{layout.vpp}) needs the micro-batches per mini-step "
             f"({plan.microbatches_per_ministep}) to be a multiple of "
             f"--pipeline-model-parallel-size {layout.pp}")])
    return plan


# ----------------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class ParamEstimate:
    """Parameter counts: the whole model (as Hugging Face counts it) and the fullest GPU."""

    total: int
    active: int  # per token: everything but the unselected experts
    per_gpu: int  # fullest pipeline stage, PR2 predictors included when used
    predictor_per_gpu: int

    @property
    def optimizer_state_gib_per_gpu(self) -> float:
        return self.per_gpu * OPTIMIZER_STATE_BYTES_PER_PARAM / GIB


@dataclasses.dataclass(frozen=True)
class _LayerParams:
    tp_split: int  # attention, dense MLP, shared-expert linears: split over TP
    replicated: int  # norms, router, shared-expert gate: whole on every rank
    experts: int  # routed experts: split over EP x ETP
    predictor: int  # PR2 evolution predictor (E x d): whole on every rank


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


def estimate_params(spec, layout: Layout, with_predictor: bool) -> ParamEstimate:
    """Count parameters from the HF config: in total and on the fullest GPU of ``layout``."""
    d = spec.hidden_size
    layers = [_layer_params(spec, i) for i in range(spec.num_layers)]
    embedding = spec.vocab_size * d
    body = sum(p.tp_split + p.replicated + p.experts for p in layers)
    total = embedding + (0 if spec.tie_word_embeddings else embedding) + d + body
    all_experts = sum(p.experts for p in layers)
    active = total - all_experts * (spec.num_experts - spec.top_k) // spec.num_experts
    per_gpu = predictor = 0
    for rank in range(layout.pp):
        held = [layers[i] for i in stage_layers(spec.num_layers, layout.pp, layout.vpp, rank)]
        count = sum(p.tp_split // layout.tp + p.replicated + p.experts // (layout.ep * layout.etp)
                    for p in held)
        if rank == 0:
            count += embedding // layout.tp
        if rank == layout.pp - 1:  # output layer (a second copy when tied under PP) + final norm
            tied_here = spec.tie_word_embeddings and layout.pp == 1
            count += (0 if tied_here else embedding // layout.tp) + d
        stage_predictor = sum(p.predictor for p in held) if with_predictor else 0
        if count + stage_predictor > per_gpu:
            per_gpu, predictor = count + stage_predictor, stage_predictor
    return ParamEstimate(total, active, per_gpu, predictor)


def predictor_host_gib_per_gpu(spec, layout: Layout, batch: BatchPlan, cfg: RunConfig,
                               prompt_tokens: int) -> float:
    """Pinned host memory for one rollout batch's recorded ``h_old, p_old`` (fp32), per GPU.

    Upper bound: every sample at ``prompt_tokens + --max-new-tokens`` tokens; tokens split over
    TP under sequence parallelism; the MoE layers of the fullest pipeline stage.
    """
    tokens = batch.samples_per_dp_rank * (prompt_tokens + cfg.rollout.max_new_tokens)
    if layout.sequence_parallel:
        tokens //= layout.tp
    moe_layers = max(sum(spec.moe_layer_pattern[i]
                         for i in stage_layers(spec.num_layers, layout.pp, layout.vpp, rank))
                     for rank in range(layout.pp))
    row_bytes = 4 * (spec.hidden_size + spec.num_experts)
    return tokens * cfg.predictor.predictor_sample_ratio * moe_layers * row_bytes / GIB


# ----------------------------------------------------------------------------------- rollout
def parse_sglang_urls(text: str) -> list[str]:
    """Split ``--sglang-urls`` into ``http(s)://host:port`` addresses.

    Raises:
        ValidationError: naming each malformed or repeated address.
    """
    urls = [u.strip() for u in text.split(",")]
    if not any(urls):
        raise ValidationError(["--sglang-urls is empty; expected http://host:port[,...]"])
    problems = []
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if (parts.scheme not in ("http", "https") or not parts.hostname or port is None
                or parts.path not in ("", "/") or parts.query):
            problems.append(f"--sglang-urls entry {url!r} is not of the form http://host:port")
    if len(set(urls)) != len(urls):
        problems.append("--sglang-urls lists a server more than once")
    if problems:
        raise ValidationError(problems)
    return urls


# ----------------------------------------------------------------------------------- settings
def config_problems(cfg: RunConfig, spec, layout: Layout) -> list[str]:
    """Settings that contradict each other or the model."""
    problems = []
    if cfg.model.transformer_impl == "transformer_engine" and cfg.model.device == "cpu":
        problems.append("--transformer-impl transformer_engine cannot run with --device cpu")
    if cfg.rollout.max_new_tokens >= spec.max_position_embeddings:
        problems.append(f"--max-new-tokens {cfg.rollout.max_new_tokens} does not fit the model's "
                        f"max_position_embeddings {spec.max_position_embeddings}")
    if cfg.model.fp8_format:
        sizes = (("hidden_size", spec.hidden_size),
                 ("moe_intermediate_size / ETP", spec.moe_ffn_hidden_size // max(layout.etp, 1)))
        problems += [f"FP8 GEMMs need {name} divisible by 16, got {size}"
                     for name, size in sizes if size % 16]
    if cfg.train.save_interval and not cfg.train.save:
        problems.append("--save-interval needs --save DIR")
    return problems


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def package_problems(cfg: RunConfig) -> list[str]:
    """Optional packages the run needs that are missing here (checked on any machine)."""
    needs = []
    if cfg.train.tensorboard_dir:
        needs.append(("tensorboard", "--tensorboard-dir"))
    if cfg.task.task == "math":
        needs.append(("math_verify", "--task math"))
    if cfg.rollout.rollout_engine == "sglang":
        needs.append(("requests", "--rollout-engine sglang"))
    return [f"{flag} needs the Python package {pkg!r}, which is not installed"
            for pkg, flag in needs if not _importable(pkg)]


def input_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """(flag, path) of every input file or directory the run reads (Hub names excluded)."""
    paths = [("--load", cfg.model.load), ("--data-path", cfg.task.data_path)]
    tokenizer = cfg.task.tokenizer
    if tokenizer and (os.path.isabs(tokenizer) or tokenizer.startswith(".")):
        paths.append(("--tokenizer", tokenizer))
    return [(flag, path) for flag, path in paths if path]


def runtime_problems(cfg: RunConfig, gpus_per_node: int) -> list[str]:
    """What only the launch machine can tell: inputs, CUDA, GPU count, TransformerEngine, FP8."""
    import torch

    problems = [f"{flag} {path} does not exist" for flag, path in input_paths(cfg)
                if not os.path.exists(path)]
    if cfg.model.device == "cpu":
        return problems
    if not torch.cuda.is_available():
        return [*problems, ("CUDA is not available on this machine (validate without GPUs by "
                            "leaving out --check-runtime, i.e. the script's --dry-run)")]
    if torch.cuda.device_count() < gpus_per_node:
        problems.append(f"GPUS_PER_NODE={gpus_per_node} but this node has "
                        f"{torch.cuda.device_count()} visible GPUs")
    if cfg.model.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
        problems.append("--transformer-impl transformer_engine: transformer_engine is not "
                        "importable (pip install 'megatron_pr2[gpu]')")
    capability = torch.cuda.get_device_capability()
    if cfg.model.fp8_format and capability < (8, 9):
        problems.append(f"--fp8-format {cfg.model.fp8_format} needs a GPU with compute "
                        f"capability >= 8.9 (H100, Ada); this one is {capability}")
    return problems


# ----------------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    """The outcome of a validation: summary lines and non-fatal notes."""

    lines: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _summary_lines(spec, layout: Layout, batch: BatchPlan, cfg: RunConfig) -> list[str]:
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


def _add_rollout(report: Report, cfg: RunConfig, layout: Layout) -> None:
    if cfg.rollout.rollout_engine != "sglang":
        report.lines.append("rollout engine: in-process (on rank 0)")
        if cfg.rollout.sglang_urls:
            report.notes.append("--sglang-urls is ignored by --rollout-engine inprocess")
        return
    urls = parse_sglang_urls(cfg.rollout.sglang_urls)
    report.lines.append(f"rollout engine: SGLang, {len(urls)} server(s): {', '.join(urls)}")
    if layout.world_size == 1:
        return
    if cfg.train.save:
        report.lines.append(f"weight sync: {os.path.join(cfg.train.save, 'weight_sync_hf')} "
                            "(must be readable by every SGLang server)")
    else:
        report.notes.append("--save is not set: weight sync goes through a temporary directory "
                            "on node 0, which SGLang servers on other hosts cannot read")


def _add_memory(report: Report, cfg: RunConfig, spec, layout: Layout, batch: BatchPlan,
                gpus_per_node: int, gpu_memory_gib: float, prompt_tokens: int) -> None:
    with_predictor = routing_method(cfg.algo.routing_method).trains_predictor
    params = estimate_params(spec, layout, with_predictor)
    states = params.optimizer_state_gib_per_gpu
    predictor = (f" incl. {params.predictor_per_gpu / 1e6:.1f}M PR2 predictor"
                 if params.predictor_per_gpu else "")
    report.lines += [
        f"parameters: {params.total / 1e9:.2f}B total, {params.active / 1e9:.2f}B active per token",
        f"parameters per GPU (fullest stage): {params.per_gpu / 1e9:.3f}B{predictor}",
        (f"weights+grads+Adam per GPU: {states:.1f} GiB of {gpu_memory_gib:g} GiB (fp32, "
         f"{OPTIMIZER_STATE_BYTES_PER_PARAM} B/param; activations not included)"),
    ]
    if states > gpu_memory_gib:
        raise ValidationError([
            (f"weights+grads+Adam need {states:.1f} GiB per GPU, more than the {gpu_memory_gib:g} "
             "GiB of a GPU: raise TP/PP/EP or add nodes")])
    if states > 0.75 * gpu_memory_gib:
        report.notes.append("weights+grads+Adam use over 75% of GPU memory: little room is left "
                            "for activations")
    if with_predictor:
        host = predictor_host_gib_per_gpu(spec, layout, batch, cfg, prompt_tokens)
        report.lines.append(
            f"PR2 recorded predictor inputs: <= {host:.1f} GiB pinned host memory per GPU, "
            f"{host * gpus_per_node:.0f} GiB per node (--predictor-sample-ratio "
            f"{cfg.predictor.predictor_sample_ratio:g}, {prompt_tokens}-token prompts assumed)")
    if batch.microbatches_per_ministep < layout.pp:
        report.notes.append(f"only {batch.microbatches_per_ministep} micro-batches per mini-step "
                            f"for {layout.pp} pipeline stages: the pipeline will mostly idle")


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
    report.notes += [f"{flag} {path} does not exist here (required at launch)"
                     for flag, path in input_paths(cfg) if not os.path.exists(path)]


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
    spec = load_model_spec(cfg.model.hf_config)
    world = nnodes * gpus_per_node
    layout = Layout.of(cfg.parallel, world)
    world_problems = layout_problems(cfg.parallel, world)
    problems = [*world_problems, *model_division_problems(spec, layout),
                *config_problems(cfg, spec, layout), *package_problems(cfg)]
    batch = None if world_problems else _collect(problems, plan_batch, cfg, layout)
    if cfg.rollout.rollout_engine == "sglang":
        _collect(problems, parse_sglang_urls, cfg.rollout.sglang_urls)
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
        prog="python -m megatron_pr2.validate",
        description="Validate a megatron_pr2.train configuration for a cluster layout (no "
                    "launch). Training flags go after '--'.")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--print-layout", action="store_true",
                        help="only parse the flags and print 'TP PP EP ETP' (for shell scripts)")
    parser.add_argument("--check-runtime", action="store_true",
                        help="also check input files, CUDA, GPU count, TransformerEngine and FP8")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
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
