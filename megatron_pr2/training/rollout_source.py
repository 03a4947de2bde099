"""Where rollout batches come from: a task's prompts, an engine's samples, the task's rewards.

Rank 0 (the rollout driver) alone holds the engine: it generates the batch, scores each sample
in a worker thread as soon as the engine hands it over (while the others still generate), and
sends every rank only what its data-parallel rank trains on (its share, with routes for its
pipeline stage's MoE layers only and, under sequence parallelism, only the token rows its
routers read; the rest as token-only stubs; :func:`~megatron_pr2.rollout.exchange.dp_view`).
The other ranks wait on the gloo host group, bounded by ``--distributed-timeout-minutes``,
never inside an NCCL collective.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

import torch
import torch.distributed as dist

from megatron_pr2.config import RunConfig
from megatron_pr2.rollout.exchange import (
    broadcast_object,
    dp_view,
    gather_rank_views,
    scatter_object,
)
from megatron_pr2.rollout.grid_layout import GridLayout
from megatron_pr2.rollout.sample import Sample, SampleStatus, SamplingParams
from megatron_pr2.rollout.sglang_server import API_KEY_ENV
from megatron_pr2.rollout.weight_version import batch_version
from megatron_pr2.tasks import CharTokenizer, DigitTask, DigitTaskConfig, prompt_ids
from megatron_pr2.training.rollout_batch import needs_uniform_width

logger = logging.getLogger(__name__)

REWARD_WORKERS = 4  # threads scoring samples while the engine generates


class DigitPrompts:
    """The embedded digit task with its character tokenizer."""

    def __init__(self, cfg: RunConfig):
        self.task = DigitTask(DigitTaskConfig(min_len=cfg.task.task_min_len,
                                              max_len=cfg.task.task_max_len, seed=cfg.train.seed,
                                              partial_credit=cfg.task.partial_credit,
                                              stratified=cfg.task.task_stratified))
        self.tokenizer = CharTokenizer()
        self.stop_token_ids = (self.tokenizer.eos_id,)

    def prompts(self, start: int, count: int, split: str):
        problems = self.task.problems(start, count, split)
        return problems, [prompt_ids(self.tokenizer, p) for p in problems]

    def reward(self, problem, response_ids) -> float:
        return self.task.reward(problem, self.tokenizer.decode(response_ids))


class MathPrompts:
    """A JSONL/parquet prompt+answer dataset with an HF tokenizer; answers checked by math-verify.

    Training reads the train split as a seeded stream reshuffled every epoch; evaluation reads
    the eval split (``--eval-data-path``, or ``--eval-fraction`` of ``--data-path`` held out).
    """

    def __init__(self, cfg: RunConfig):
        from transformers import AutoTokenizer

        from megatron_pr2.tasks import MathDataset, load_problems, split_problems

        task, seed = cfg.task, cfg.train.seed
        train, held_out = split_problems(load_problems(task.data_path), task.eval_fraction, seed)
        if task.eval_data_path:
            held_out = load_problems(task.eval_data_path)
        self.splits = {"train": MathDataset(train, seed=seed)}
        if held_out:
            self.splits["eval"] = MathDataset(held_out, seed=seed)
        self.apply_chat_template = task.apply_chat_template
        self.tokenizer = AutoTokenizer.from_pretrained(task.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = (eos,) if eos is not None else ()

    def prompts(self, start: int, count: int, split: str):
        if split not in self.splits:
            raise ValueError(f"the math task has no {split!r} split: give --eval-data-path or "
                             "--eval-fraction")
        problems = self.splits[split].problems(start, count, split)
        return problems, [self._prompt_ids(p.prompt) for p in problems]

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str) and not self.apply_chat_template:
            return self.tokenizer.encode(prompt)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids)

    def reward(self, problem, response_ids) -> float:
        from megatron_pr2.tasks import math_reward

        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        return math_reward(text, problem.answer)


def make_prompts(cfg: RunConfig):
    return DigitPrompts(cfg) if cfg.task.task == "digits" else MathPrompts(cfg)


def _is_driver() -> bool:
    return dist.get_rank() == 0


def _host_group():
    from megatron_pr2.platform.distributed import host_group

    return host_group()


class RolloutSource:
    """Generates and scores the rollout batch of each iteration (deterministic per iteration).

    Args:
        cfg: the run config.
        engine: the rollout engine on rank 0; None on the other ranks.
        prompts: the task's prompt source.
        dp: ``(dp_size, dp_rank)`` of this rank (default: no data parallelism).
        route_slots: positions on the MoE-layer axis of this rank's pipeline-stage layers
            (:func:`~megatron_pr2.rollout.alignment.stage_route_slots`); None: all layers.
        layout: this rank's micro-batch layout (:func:`grid_layout_of`); where its routers read
            only part of each grid row (sequence parallelism), it receives only those route
            rows. None: every token's routes.

    Attributes:
        data_position: training prompts consumed so far (saved in the trainer state).
    """

    def __init__(self, cfg: RunConfig, engine, prompts, dp: tuple[int, int] = (1, 0),
                 route_slots: tuple[int, ...] | None = None,
                 layout: GridLayout | None = None):
        if _is_driver() and engine is None:
            raise ValueError("the rollout driver (rank 0) needs a rollout engine")
        self.cfg = cfg
        self.engine = engine
        self.prompt_source = prompts
        self.dp = dp
        self.route_slots = None if route_slots is None else tuple(route_slots)
        # a layout that reads whole rows needs no cut: ranks that share a view share its pickle
        self.layout = layout if layout is not None and layout.splits_tokens else None
        self.data_position = 0
        self._rank_views: list[tuple] | None = None

    def _sampling(self, seed: int, greedy: bool = False) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.cfg.rollout.max_new_tokens,
                              temperature=self.cfg.rollout.temperature, greedy=greedy,
                              stop_token_ids=tuple(self.prompt_source.stop_token_ids), seed=seed)

    def collect(self, iteration: int) -> tuple[list[Sample], dict[str, float]]:
        """The scored samples of ``iteration`` (group-major: a prompt's samples are adjacent),
        generated now with the engine's current weights (collective).

        Every rank gets the whole batch's length, but routes and log-probs only for the samples
        of its data-parallel share (``shard_for_dp``), routes cut to what its routers read
        (``route_slots``, ``layout``); the others are token-only stubs.
        """
        start = self.reserve_prompts()
        batch = self.generate(iteration, start) if _is_driver() else None
        return self.distribute(batch)

    def reserve_prompts(self) -> int:
        """The position of the next batch's first prompt (every rank keeps the count)."""
        start = self.data_position
        self.data_position += self.cfg.rollout.rollout_batch_prompts
        return start

    def distribute(self, batch) -> tuple[list[Sample], dict[str, float]]:
        """Collective: the driver's ``batch`` (None elsewhere) as each rank's view of it."""
        if dist.get_world_size() == 1:
            return batch
        rank_views = self._view_of_every_rank()
        per_rank = None
        if _is_driver():
            samples, metrics = batch
            views = {view: dp_view(samples, *view) for view in set(rank_views)}
            per_rank = [(views[view], metrics) for view in rank_views]
        return scatter_object(per_rank, src=0, group=_host_group())

    def _view_of_every_rank(self) -> list[tuple]:
        if self._rank_views is None:
            self._rank_views = gather_rank_views((*self.dp, self.route_slots, self.layout),
                                                 group=_host_group())
        return self._rank_views

    def generate(self, iteration: int, start: int) -> tuple[list[Sample], dict[str, float]]:
        """Rollout driver only, no collective (may run in a background thread): generate and
        score the batch of ``iteration`` from training prompt ``start`` on."""
        n = self.cfg.rollout.n_samples_per_prompt
        problems, prompt_tokens = self.prompt_source.prompts(
            start, self.cfg.rollout.rollout_batch_prompts, "train")
        repeated = [tokens for tokens in prompt_tokens for _ in range(n)]
        with concurrent.futures.ThreadPoolExecutor(REWARD_WORKERS, "reward") as scorer:
            scoring = []

            def score_when_ready(index: int, sample: Sample) -> None:
                scoring.append(scorer.submit(self._score, problems[index // n], index // n, sample))

            samples = self.engine.generate(repeated, self._sampling(self.cfg.train.seed + iteration),
                                           return_routed_experts=self._wants_engine_routes(),
                                           on_sample=score_when_ready)
            for future in scoring:
                future.result()
        return samples, self._metrics(samples)

    def _wants_engine_routes(self) -> bool:
        """Routes are asked of the engine only by methods that replay them (R3, PR2-engine):
        they are most of the generation payload (~7 MB per 4.6k-token Qwen3-30B-A3B sample)."""
        from megatron_pr2.routing.methods import routing_method

        return routing_method(self.cfg.algo.routing_method,
                              self.cfg.predictor.predictor).uses_engine_routes

    def _score(self, problem, group: int, sample: Sample) -> None:
        sample.reward = self.prompt_source.reward(problem, sample.response_tokens.tolist())
        sample.metadata.update(group=group, answer=problem.answer, scored_at=time.monotonic())
        if sample.status is SampleStatus.PENDING:
            sample.status = SampleStatus.COMPLETED

    def _metrics(self, samples: list[Sample]) -> dict[str, float]:
        rewards = torch.tensor([s.reward for s in samples])
        lengths = torch.tensor([float(s.response_length) for s in samples])
        truncated = sum(s.status is SampleStatus.TRUNCATED for s in samples) / len(samples)
        version = batch_version(samples)
        metrics = {"rollout/reward_mean": float(rewards.mean()),
                   "rollout/reward_std": float(rewards.std()) if len(samples) > 1 else 0.0,
                   "rollout/response_length": float(lengths.mean()),
                   "rollout/truncated_fraction": float(truncated)}
        if version is not None:
            metrics["rollout/weight_version"] = float(version)
        if hasattr(self.engine, "metrics"):
            metrics.update(self.engine.metrics())
        return metrics

    def evaluate(self, count: int) -> dict[str, float]:
        """Greedy reward on ``count`` held-out prompts (rank 0 generates; all ranks return it)."""
        value = None
        if _is_driver():
            problems, tokens = self.prompt_source.prompts(0, count, "eval")
            samples = self.engine.generate(tokens, self._sampling(0, greedy=True),
                                           return_routed_experts=False)
            value = sum(self.prompt_source.reward(p, s.response_tokens.tolist())
                        for p, s in zip(problems, samples)) / len(samples)
        if dist.get_world_size() > 1:
            value = broadcast_object(value, src=0, group=_host_group())
        return {"eval/greedy_reward": value}


def data_parallel_coordinates(groups) -> tuple[int, int]:
    """``(dp_size, dp_rank)`` of this rank in the run's ``ProcessGroupCollection``."""
    return groups.dp.size(), groups.dp.rank()


def stage_route_slots_of(parts) -> tuple[int, ...]:
    """The MoE-layer positions of this rank's pipeline stage, for a run's ``Components``."""
    from megatron_pr2.rollout.alignment import model_layer_numbers, stage_route_slots
    from megatron_pr2.rollout.route_codec import RouteShape

    return stage_route_slots(RouteShape.from_hf_config(parts.spec),
                             model_layer_numbers(parts.model))


def grid_layout_of(parts) -> GridLayout:
    """How this rank lays out its micro-batches, for a run's ``Components`` (the trainer's
    :meth:`~megatron_pr2.training.loop.RLLoop._microbatches` builds its grids with it)."""
    return GridLayout(parts.cfg.train.micro_batch_size, parts.token_parallel,
                      needs_uniform_width(parts.model[0].config))


def make_engine(cfg: RunConfig, hf_config: dict):
    """The rollout engine of ``cfg`` on the rollout driver (rank 0); None on the other ranks."""
    if dist.is_initialized() and not _is_driver():
        return None
    if cfg.rollout.rollout_engine == "sglang":
        from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig

        urls = [u.strip() for u in cfg.rollout.sglang_urls.split(",") if u.strip()]
        transport = SGLangClientConfig(request_timeout=cfg.rollout.rollout_timeout,
                                       max_concurrency=cfg.rollout.rollout_max_concurrency,
                                       rejoin_interval=cfg.rollout.server_rejoin_interval,
                                       api_key=os.environ.get(API_KEY_ENV) or None)
        return SGLangClient.for_hf_config(urls, hf_config, config=transport)
    from megatron_pr2.rollout.inprocess import InProcessEngine

    dtype = torch.bfloat16 if cfg.rollout.rollout_dtype == "bf16" else torch.float32
    return InProcessEngine(hf_config, dtype=dtype, max_batch_size=64, seed=cfg.train.seed)
