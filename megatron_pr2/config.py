"""Run configuration: small dataclasses per component, a YAML config file, Megatron-LM flag names.

Every field is a command-line flag named after it (``tensor_model_parallel_size`` ->
``--tensor-model-parallel-size``, as in Megatron-LM). A ``--config`` YAML file may set any field,
either flat or under its section name (``parallel:``, ``rollout:`` ...); flags given on the
command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any

import yaml

from megatron_pr2.cli_errors import DEBUG_FLAG
from megatron_pr2.cli_help import train_flag_help, train_flag_metavar
from megatron_pr2.models.moe_options import FP8_ALIGNMENT
from megatron_pr2.platform.distributed import ParallelConfig
from megatron_pr2.rl.batch_plan import plan_batch
from megatron_pr2.rl.losses import PolicyLossConfig
from megatron_pr2.routing.methods import PREDICTORS, ROUTING_METHODS, routing_method

# Fusions Megatron-Core runs only with TransformerEngine (CUDA); none of them touches the routes.
TE_FUSIONS = ("moe_permute_fusion", "apply_rope_fusion", "gradient_accumulation_fusion")


@dataclasses.dataclass
class ModelArgs:
    """The model: an HF config (directory, config.json, or an embedded preset name)."""

    hf_config: str = "tiny-qwen3-moe"
    load: str | None = None  # Megatron checkpoint to start from (tools/convert.py hf-to-megatron)
    transformer_impl: str = "local"  # local | transformer_engine
    fp8_format: str | None = None  # e4m3 | hybrid (TransformerEngine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise (Megatron-LM names)
    moe_token_dispatcher_type: str | None = None  # allgather | alltoall (default: alltoall if EP>1)
    moe_grouped_gemm: bool = False  # grouped expert GEMMs (TransformerEngine GroupedLinear)
    recompute_granularity: str | None = None  # full | selective
    device: str | None = None  # cpu | cuda (default: cuda when available)
    strict_device: bool = False  # CPU backend: refuse host tensors at the model/loss/collectives
    moe_permute_fusion: bool = False  # fused MoE token permute/unpermute (TransformerEngine, CUDA)
    apply_rope_fusion: bool = False  # fused rotary embedding (TransformerEngine, CUDA)
    bias_swiglu_fusion: bool = False  # fused SwiGLU activation (Megatron's jit kernel)
    gradient_accumulation_fusion: bool = False  # weight grads accumulated in the TE GEMMs

    def validate(self) -> None:
        _choice("transformer_impl", self.transformer_impl, ("local", "transformer_engine"))
        _choice("fp8_format", self.fp8_format, (None, "e4m3", "hybrid"))
        _choice("fp8_recipe", self.fp8_recipe, tuple(FP8_ALIGNMENT))
        _choice("moe_token_dispatcher_type", self.moe_token_dispatcher_type,
                (None, "allgather", "alltoall"))
        _choice("recompute_granularity", self.recompute_granularity, (None, "full", "selective"))
        _choice("device", self.device, (None, "cpu", "cuda"))
        if self.transformer_impl == "transformer_engine" and self.device == "cpu":
            raise ValueError("--transformer-impl transformer_engine cannot run with --device cpu")
        if self.fp8_format and self.transformer_impl != "transformer_engine":
            raise ValueError("--fp8-format needs --transformer-impl transformer_engine")
        if self.strict_device and self.device == "cuda":
            raise ValueError("--strict-device checks device placement under the CPU backend; "
                             "it cannot be used with --device cuda")
        te_fusions = [f"--{name.replace('_', '-')}" for name in TE_FUSIONS if getattr(self, name)]
        if te_fusions and self.transformer_impl != "transformer_engine":
            raise ValueError(f"{', '.join(te_fusions)} need --transformer-impl transformer_engine "
                             "(Megatron-Core runs these fused kernels only through "
                             "TransformerEngine, on CUDA)")
        if self.moe_grouped_gemm and self.transformer_impl != "transformer_engine":
            raise ValueError("--moe-grouped-gemm needs --transformer-impl transformer_engine "
                             "(TransformerEngine's GroupedLinear experts)")



@dataclasses.dataclass
class RolloutArgs:
    """Rollout engine and sampling."""

    rollout_engine: str = "inprocess"  # inprocess | sglang
    sglang_urls: str = ""  # comma-separated http://host:port of SGLang servers
    rollout_dtype: str = "bf16"  # in-process engine precision: bf16 | fp32
    rollout_batch_prompts: int = 8  # prompts per rollout batch
    n_samples_per_prompt: int = 4  # GRPO group size
    max_new_tokens: int = 12
    temperature: float = 1.0
    rollout_timeout: float = 120.0  # s per request; with the whole batch in flight ~ the batch time
    rollout_max_concurrency: int = 0  # SGLang requests in flight at once (0: the whole batch)
    async_rollout: bool = False  # generate batch k+1 while batch k trains (one-step off-policy)
    max_weight_staleness: int = 1  # with --async-rollout: 1 overlaps rollout and training, 0 not
    server_rejoin_interval: float = 60.0  # s between /health probes of an evicted server (0: off)
    weight_sync: str | None = None  # tensor | distributed | disk (default: tensor in-process, distributed for SGLang)
    weight_sync_bucket_mb: int = 512  # bucket size: peak extra memory of a sync
    weight_sync_dtype: str | None = None  # bf16 | fp32 | fp16 (default: the engine's dtype)
    weight_sync_master_addr: str | None = None  # trainer address for SGLang (one node; per node: $MEGATRON_PR2_WEIGHT_SYNC_ADDR)

    def validate(self) -> None:
        _choice("rollout_engine", self.rollout_engine, ("inprocess", "sglang"))
        _choice("weight_sync", self.weight_sync, (None, "tensor", "distributed", "disk"))
        if self.weight_sync == "distributed" and self.rollout_engine != "sglang":
            raise ValueError("--weight-sync distributed needs --rollout-engine sglang")
        _choice("weight_sync_dtype", self.weight_sync_dtype, (None, "bf16", "fp32", "fp16"))
        _positive("weight_sync_bucket_mb", self.weight_sync_bucket_mb)
        if self.rollout_max_concurrency < 0:
            raise ValueError("--rollout-max-concurrency must be >= 0 (0: the whole batch), got "
                             f"{self.rollout_max_concurrency}")
        if self.max_weight_staleness not in (0, 1):
            raise ValueError("--max-weight-staleness must be 0 or 1 (a batch generated at most one "
                             f"weight version behind its policy), got {self.max_weight_staleness}")
        if self.server_rejoin_interval < 0:
            raise ValueError("--server-rejoin-interval must be >= 0 s (0: an evicted server never "
                             f"rejoins), got {self.server_rejoin_interval}")
        _choice("rollout_dtype", self.rollout_dtype, ("bf16", "fp32"))
        if self.rollout_engine == "sglang" and not self.sglang_urls:
            raise ValueError("--rollout-engine sglang needs --sglang-urls http://host:port[,...]")
        _positive("rollout_batch_prompts", self.rollout_batch_prompts)
        _positive("n_samples_per_prompt", self.n_samples_per_prompt)
        _positive("max_new_tokens", self.max_new_tokens)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be a finite number > 0 (RL samples its "
                             f"rollouts), got {self.temperature}")


@dataclasses.dataclass
class AlgoArgs:
    """RL algorithm: routing method, policy loss and its options, off-policy window."""

    routing_method: str = "pr2"  # a name of megatron_pr2.routing.methods.ROUTING_METHODS
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    tis: bool = False
    tis_cap: float = PolicyLossConfig.tis_cap  # the loss options' defaults are the loss's own
    icepop: bool = False
    icepop_low: float = PolicyLossConfig.icepop_low
    icepop_high: float = PolicyLossConfig.icepop_high
    rspo: bool = False
    rspo_gamma_min: float = PolicyLossConfig.rspo_gamma_min
    off_policy_window: int = 4  # optimizer mini-steps per rollout batch
    normalize_advantage_std: bool = True
    lookahead_scale: float = 0.75  # pr2-lookahead: route mini-batch m at theta_0 + c (m-1) u
    drift_attribution_tokens: int = 128  # router-input vs router-weight drift, tokens per step
    log_update_direction: bool = False  # diagnostic: real mini-step updates vs Adam's next step

    def validate(self) -> None:
        _choice("routing_method", self.routing_method, tuple(ROUTING_METHODS))
        _choice("policy_loss", self.policy_loss, ("ppo_clip", "gspo"))
        _positive("off_policy_window", self.off_policy_window)
        if self.lookahead_scale < 0:
            raise ValueError(f"--lookahead-scale must be >= 0, got {self.lookahead_scale}")
        if self.drift_attribution_tokens < 0:
            raise ValueError("--drift-attribution-tokens must be >= 0 (0 turns it off)")


@dataclasses.dataclass
class PredictorArgs:
    """The PR2 evolution predictor."""

    predictor: str = "learned"  # learned | optimizer (pr2: W_p = c (m-1) u_r, no learning)
    predictor_loss: str = "kl-post"  # kl-post | kl | l2
    predictor_lr_mult: float = 1.0
    predictor_sample_ratio: float = 1.0

    def validate(self) -> None:
        _choice("predictor", self.predictor, PREDICTORS)
        _choice("predictor_loss", self.predictor_loss, ("kl-post", "kl", "l2"))
        if not 0 < self.predictor_sample_ratio <= 1:
            raise ValueError("--predictor-sample-ratio must be in (0, 1]")
        if self.predictor_lr_mult <= 0:
            raise ValueError("--predictor-lr-mult must be > 0")


@dataclasses.dataclass
class TrainArgs:
    """Optimisation, batching, logging and checkpoints (Megatron-LM names where they exist)."""

    train_iters: int = 20  # RL iterations (rollout batches)
    micro_batch_size: int = 4
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "constant"  # constant | linear | cosine (OptimizerParamScheduler)
    lr_warmup_iters: int = 0  # optimizer steps of linear warm-up from 0
    lr_decay_iters: int | None = None  # optimizer steps to decay over (default: all of them)
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # global grad-norm clip (0 = off)
    bf16: bool = False  # bf16 weights and compute (Float16Module), fp32 main params and grads
    use_distributed_optimizer: bool = False  # shard optimizer state over data parallel ranks
    overlap_grad_reduce: bool = False  # Megatron DDP: reduce grad buckets during backward
    seed: int = 1234
    save: str | None = None
    save_interval: int = 0
    eval_interval: int = 0
    eval_prompts: int = 32
    eval_before_train: bool = False  # greedy evaluation of the starting weights, logged at step 0
    tensorboard_dir: str | None = None
    log_jsonl: str | None = None
    warmup_sft_steps: int = 0  # supervised warm-up steps before RL (embedded task only)
    warmup_sft_lr: float = 1e-3
    keep_last: int = 0  # keep only the N newest checkpoints (0: all)
    max_consecutive_skips: int = 8  # optimizer steps in a row with non-finite loss/grad -> stop
    allow_resharding: bool = False  # resume under another parallel layout

    def validate(self) -> None:
        _positive("train_iters", self.train_iters)
        _positive("micro_batch_size", self.micro_batch_size)
        _positive("max_consecutive_skips", self.max_consecutive_skips)
        _learning_rate("lr", self.lr)
        _learning_rate("warmup_sft_lr", self.warmup_sft_lr)
        if self.keep_last < 0:
            raise ValueError(f"--keep-last must be >= 0 (0 keeps all), got {self.keep_last}")
        _choice("lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.lr}], got {self.min_lr}")
        if self.lr_warmup_iters < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("--lr-warmup-iters, --clip-grad and --weight-decay must be >= 0")
        if self.lr_decay_iters is not None:
            _positive("lr_decay_iters", self.lr_decay_iters)

    def lr_decay_steps(self, optimizer_steps: int) -> int:
        """Optimizer steps the LR decays over: ``--lr-decay-iters``, default the whole run."""
        return self.lr_decay_iters or optimizer_steps

    def check_lr_schedule(self, optimizer_steps: int) -> None:
        """A decaying LR must decay after its warm-up ends (constant: decay steps unused)."""
        decay = self.lr_decay_steps(optimizer_steps)
        if self.lr_decay_style != "constant" and decay <= self.lr_warmup_iters:
            source = ("--lr-decay-iters" if self.lr_decay_iters else
                      "the run's optimizer steps (--train-iters x --off-policy-window)")
            raise ValueError(f"--lr-decay-style {self.lr_decay_style}: {source} = {decay} must "
                             f"exceed --lr-warmup-iters ({self.lr_warmup_iters})")


@dataclasses.dataclass
class TaskArgs:
    """What to train on: the embedded digit task or a JSONL/parquet prompt+answer dataset."""

    task: str = "digits"  # digits | math
    data_path: str | None = None
    task_min_len: int = 3
    task_max_len: int = 6
    partial_credit: bool = False  # digit task: reward the share of matching answer positions
    task_stratified: bool = False  # digit task: operation and length cycle with the problem index
    tokenizer: str | None = None  # HF tokenizer directory (math task)
    eval_data_path: str | None = None  # math eval problems (else --eval-fraction of --data-path)
    eval_fraction: float = 0.0  # math: share of --data-path held out (seeded) for evaluation
    apply_chat_template: bool = False  # math: wrap text prompts as a user turn of the chat template

    def validate(self) -> None:
        _choice("task", self.task, ("digits", "math"))
        if self.task == "math" and not (self.data_path and self.tokenizer):
            raise ValueError("--task math needs --data-path (JSONL/parquet) and --tokenizer")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_data_path and self.eval_fraction:
            raise ValueError("give either --eval-data-path or --eval-fraction, not both")
        if self.partial_credit and self.task != "digits":
            raise ValueError("--partial-credit is a reward of the digit task (--task digits)")
        if self.task_stratified and self.task != "digits":
            raise ValueError("--task-stratified orders the digit task's problems (--task digits)")

    @property
    def has_eval_split(self) -> bool:
        """Whether evaluation has problems of its own (the digit task always has)."""
        return self.task == "digits" or bool(self.eval_data_path or self.eval_fraction)


@dataclasses.dataclass
class RunConfig:
    """Everything a training run needs."""

    model: ModelArgs = dataclasses.field(default_factory=ModelArgs)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    rollout: RolloutArgs = dataclasses.field(default_factory=RolloutArgs)
    algo: AlgoArgs = dataclasses.field(default_factory=AlgoArgs)
    predictor: PredictorArgs = dataclasses.field(default_factory=PredictorArgs)
    train: TrainArgs = dataclasses.field(default_factory=TrainArgs)
    task: TaskArgs = dataclasses.field(default_factory=TaskArgs)

    def validate(self) -> RunConfig:
        """Check every section and the cross-section rules; return self."""
        for section in _sections(self):
            section.validate()
        if self.parallel.context_parallel_size != 1:
            raise ValueError("--context-parallel-size > 1 is not supported by the RL trainer yet")
        plan_batch(self, dp=1)  # what every data-parallel size needs; the loop checks its own DP
        self.train.check_lr_schedule(self.optimizer_steps)
        if self.train.save_interval and not self.train.save:
            raise ValueError("--save-interval needs --save DIR")
        method = routing_method(self.algo.routing_method, self.predictor.predictor)  # bad pairs
        problem = method.optimizer_problem(self.train.use_distributed_optimizer)
        if problem:
            raise ValueError(problem)
        self._validate_rspo()
        if self.train.eval_before_train and not self.train.eval_interval:
            raise ValueError("--eval-before-train needs --eval-interval N (what to evaluate on)")
        if self.train.warmup_sft_steps and self.task.task != "digits":
            raise ValueError(f"--warmup-sft-steps is for the embedded digit task; leave it out "
                             f"with --task {self.task.task}")
        if self.train.eval_interval and not self.task.has_eval_split:
            raise ValueError("--eval-interval with --task math needs held-out problems: "
                             "--eval-data-path FILE or --eval-fraction F")
        return self

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (each RL iteration takes ``--off-policy-window``)."""
        return self.train.train_iters * self.algo.off_policy_window

    def _validate_rspo(self) -> None:
        """RSPO compares router log-probs at the old routes: mini-steps must replay them, and
        the loss rank must see every MoE layer and token of its micro-batch."""
        if not self.algo.rspo:
            return
        if not routing_method(self.algo.routing_method).replays:
            replaying = ", ".join(m.name for m in ROUTING_METHODS.values() if m.replays)
            raise ValueError(
                "--rspo needs the mini-steps to replay the old routes: use --routing-method "
                f"{replaying}, not {self.algo.routing_method} (live routing changes the routes)")
        if self.parallel.pipeline_model_parallel_size != 1:
            raise ValueError(
                "--rspo needs --pipeline-model-parallel-size 1: the loss (on the last stage) "
                "needs the router log-probs of every MoE layer")
        if self.parallel.sequence_parallel:
            raise ValueError(
                "--rspo cannot be used with --sequence-parallel: the loss needs the router "
                "log-probs of every token of its micro-batch")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sections(cfg: RunConfig) -> list:
    return [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise ValueError(f"--{name.replace('_', '-')} must be one of {shown}; got {value!r}")


MAX_LR = 1.0  # an Adam step of this size already rewrites every weight


def _learning_rate(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= MAX_LR):
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number in (0, {MAX_LR:g}], "
                         f"got {value}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# ----------------------------------------------------------------------------------- CLI
def _field_type(section_cls, field: dataclasses.Field):
    hints = typing.get_type_hints(section_cls)
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, plus ``--config``.

    Args:
        exit_on_error: as argparse's; ``False`` raises ``argparse.ArgumentError`` for a value
            of the wrong type instead of exiting.
    """
    parser = argparse.ArgumentParser(
        prog="python -m megatron_pr2.train",
        usage="%(prog)s [--config FILE] [--FLAG VALUE | --SWITCH | --no-SWITCH ...]",
        description="GRPO-family RL for Qwen-MoE on Megatron-Core with none/R2/R3/PR2 routing.",
        exit_on_error=exit_on_error,
    )
    parser.add_argument("--config", help="YAML file setting any of the fields below")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="print the traceback of a fault (also: MEGATRON_PR2_DEBUG=1)")
    for section in dataclasses.fields(RunConfig):
        section_cls = section.default_factory
        group = parser.add_argument_group(section.name, section_cls.__doc__.splitlines()[0])
        for field in dataclasses.fields(section_cls):
            flag = _flag(field.name)
            kind = _field_type(section_cls, field)
            text = train_flag_help(field.name, field.default)
            if kind is bool:
                group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                   default=None, help=text)
            else:
                group.add_argument(flag, dest=field.name, type=kind, default=None, help=text,
                                   metavar=train_flag_metavar(field.name))
    return parser


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def known_flags() -> list[str]:
    """Every flag :func:`build_parser` accepts (``--no-X`` forms of switches included)."""
    flags = ["--config", DEBUG_FLAG]
    for section in dataclasses.fields(RunConfig):
        section_cls = section.default_factory
        for field in dataclasses.fields(section_cls):
            flags.append(_flag(field.name))
            if _field_type(section_cls, field) is bool:
                flags.append("--no-" + field.name.replace("_", "-"))
    return flags


def _section_of_field() -> dict[str, str]:
    return {field.name: section.name
            for section in dataclasses.fields(RunConfig)
            for field in dataclasses.fields(section.default_factory)}


def _apply(cfg: RunConfig, values: dict[str, Any], source: str) -> None:
    owner = _section_of_field()
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in owner:
            raise ValueError(f"unknown setting {key!r} in {source}")
        section = getattr(cfg, owner[key])
        kind = _field_type(type(section), _field_named(type(section), key))
        setattr(section, key, _typed(value, kind, key, source))


def _field_named(section_cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(section_cls) if f.name == name)


def _typed(value, kind, key: str, source: str):
    """``value`` as the field's type (an int is a valid float, "1e-4" too: YAML 1.1 reads such
    numbers as text); raise ``ValueError`` naming the setting and ``source`` otherwise."""
    if value is None or kind not in (bool, int, float, str):
        return value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{source}: {key} must be {kind.__name__}, got {value!r}")


def _read_yaml(path: str) -> dict:
    """The settings of a ``--config`` file; ``ValueError`` naming the file (and line) otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as err:
        raise ValueError(f"--config {path}: cannot be read ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"--config {where}: not valid YAML ({problem})") from err
    return _flatten_yaml(data or {}, path)


def _flatten_yaml(data: dict, path: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    flat = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults, then the ``--config`` file, then command-line flags; validated."""
    args = build_parser().parse_args(argv)
    cfg = RunConfig()
    if args.config:
        _apply(cfg, _read_yaml(args.config), f"--config {args.config}")
    given = {k: v for k, v in vars(args).items()
             if k not in ("config", "debug") and v is not None}
    _apply(cfg, given, "the command line")
    return cfg.validate()
