"""Where rollout batches come from: a task's prompts, an engine's samples, the task's rewards.

Rank 0 talks to the engine and scores the samples; every other rank receives the same scored
samples by broadcast, so all ranks train on one rollout batch.
"""

from __future__ import annotations

import logging

import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.rollout.sample import Sample, SampleStatus, SamplingParams
from megatron_pr2.tasks import CharTokenizer, DigitTask, DigitTaskConfig, prompt_ids

logger = logging.getLogger(__name__)


class DigitPrompts:
    """The embedded digit task with its character tokenizer."""

    def __init__(self, cfg: RunConfig):
        self.task = DigitTask(DigitTaskConfig(min_len=cfg.task.task_min_len,
                                              max_len=cfg.task.task_max_len, seed=cfg.train.seed))
        self.tokenizer = CharTokenizer()
        self.stop_token_ids = (self.tokenizer.eos_id,)

    def prompts(self, start: int, count: int, split: str):
        problems = self.task.problems(start, count, split)
        return problems, [prompt_ids(self.tokenizer, p) for p in problems]

    def reward(self, problem, response_ids) -> float:
        return self.task.reward(problem, self.tokenizer.decode(response_ids))


class MathPrompts:
    """A JSONL/parquet prompt+answer dataset with an HF tokenizer; answers checked by math-verify."""

    def __init__(self, cfg: RunConfig):
        from transformers import AutoTokenizer

        from megatron_pr2.tasks import load_problems

        self.problems_list = load_problems(cfg.task.data_path)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.task.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = (eos,) if eos is not None else ()

    def prompts(self, start: int, count: int, split: str):
        n = len(self.problems_list)
        problems = [self.problems_list[(start + i) % n] for i in range(count)]
        ids = [self.tokenizer.apply_chat_template(p.prompt, add_generation_prompt=True)
               if isinstance(p.prompt, list) else self.tokenizer.encode(p.prompt)
               for p in problems]
        return problems, ids

    def reward(self, problem, response_ids) -> float:
        from megatron_pr2.tasks import math_reward

        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        return math_reward(text, problem.answer)


def make_prompts(cfg: RunConfig):
    return DigitPrompts(cfg) if cfg.task.task == "digits" else MathPrompts(cfg)


def _broadcast(obj):
    holder = [obj]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


class RolloutSource:
    """Generates and scores the rollout batch of each iteration (deterministic per iteration)."""

    def __init__(self, cfg: RunConfig, engine, prompts):
        self.cfg = cfg
        self.engine = engine
        self.prompt_source = prompts

    def _sampling(self, seed: int, greedy: bool = False) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.cfg.rollout.max_new_tokens,
                              temperature=self.cfg.rollout.temperature, greedy=greedy,
                              stop_token_ids=tuple(self.prompt_source.stop_token_ids), seed=seed)

    def collect(self, iteration: int) -> tuple[list[Sample], dict[str, float]]:
        """The scored samples of ``iteration`` (group-major: a prompt's samples are adjacent)."""
        result = None
        if torch.distributed.get_rank() == 0:
            result = self._generate_and_score(iteration)
        return _broadcast(result)

    def _generate_and_score(self, iteration: int):
        rollout = self.cfg.rollout
        n = rollout.n_samples_per_prompt
        start = (iteration - 1) * rollout.rollout_batch_prompts
        problems, prompt_tokens = self.prompt_source.prompts(start, rollout.rollout_batch_prompts,
                                                             "train")
        repeated = [tokens for tokens in prompt_tokens for _ in range(n)]
        samples = self.engine.generate(repeated, self._sampling(self.cfg.train.seed + iteration))
        for index, sample in enumerate(samples):
            problem = problems[index // n]
            sample.reward = self.prompt_source.reward(problem, sample.response_tokens.tolist())
            sample.metadata.update(group=index // n, answer=problem.answer)
            if sample.status is SampleStatus.PENDING:
                sample.status = SampleStatus.COMPLETED
        rewards = torch.tensor([s.reward for s in samples])
        lengths = torch.tensor([float(s.response_length) for s in samples])
        truncated = sum(s.status is SampleStatus.TRUNCATED for s in samples) / len(samples)
        metrics = {"rollout/reward_mean": float(rewards.mean()),
                   "rollout/reward_std": float(rewards.std()) if len(samples) > 1 else 0.0,
                   "rollout/response_length": float(lengths.mean()),
                   "rollout/truncated_fraction": float(truncated)}
        return samples, metrics

    def evaluate(self, count: int) -> dict[str, float]:
        """Greedy reward on ``count`` held-out prompts (rank 0 generates; all ranks return it)."""
        value = None
        if torch.distributed.get_rank() == 0:
            problems, tokens = self.prompt_source.prompts(0, count, "eval")
            samples = self.engine.generate(tokens, self._sampling(0, greedy=True),
                                           return_routed_experts=False)
            value = sum(self.prompt_source.reward(p, s.response_tokens.tolist())
                        for p, s in zip(problems, samples)) / len(samples)
        return {"eval/greedy_reward": _broadcast(value)}


def make_engine(cfg: RunConfig, hf_config: dict):
    """The rollout engine of ``cfg`` (rank 0 only talks to it)."""
    if cfg.rollout.rollout_engine == "sglang":
        from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig

        urls = [u.strip() for u in cfg.rollout.sglang_urls.split(",") if u.strip()]
        transport = SGLangClientConfig(request_timeout=cfg.rollout.rollout_timeout)
        return SGLangClient.for_hf_config(urls, hf_config, config=transport)
    from megatron_pr2.rollout.inprocess import InProcessEngine

    dtype = torch.bfloat16 if cfg.rollout.rollout_dtype == "bf16" else torch.float32
    return InProcessEngine(hf_config, dtype=dtype, max_batch_size=64, seed=cfg.train.seed)
