"""Rollout source: the math task's splits and prompts, rewards scored while generation goes on,
the data position, and each data-parallel rank receiving only its own samples' routes (2 gloo
ranks). References: sets and orders computed in the test, a chat template rendered by hand."""

import json
import threading
import time

import pytest
import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.rollout.alignment import shard_for_dp
from megatron_pr2.rollout.sample import Sample, SampleStatus
from megatron_pr2.training.rollout_source import (
    DigitPrompts,
    MathPrompts,
    RolloutSource,
)
from tests.multiproc import run_distributed

CHAT_TEMPLATE = ("{% for m in messages %}< {{ m['role'] }} > {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}< assistant >{% endif %}")


def write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "<", ">", "user", "assistant", "what", "is", "?",
             *[str(i) for i in range(100)]]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def write_problems(path, count, offset=0):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": f"what is {i} ?", "answer": str(i)}) + "\n" for i in range(offset, offset + count))
    return str(path)


def math_config(tmp_path, seed=0, **task):
    cfg = RunConfig()
    cfg.task.task = "math"
    cfg.task.data_path = write_problems(tmp_path / "train.jsonl", 40)
    cfg.task.tokenizer = str(tmp_path / "tok")
    write_tokenizer(cfg.task.tokenizer)
    cfg.train.seed = seed
    for key, value in task.items():
        setattr(cfg.task, key, value)
    return cfg


def prompts_of(problems):
    return [p.prompt for p in problems]


def test_math_eval_split_is_disjoint_and_training_order_is_seeded_and_shuffled(tmp_path):
    source = MathPrompts(math_config(tmp_path, eval_fraction=0.25))
    train = prompts_of(source.prompts(0, 30, "train")[0])
    held_out = prompts_of(source.prompts(0, 10, "eval")[0])
    everything = [f"what is {i} ?" for i in range(40)]
    assert len(set(train)) == 30 and len(set(held_out)) == 10
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(everything)
    assert train != [p for p in everything if p in set(train)]  # not file order
    assert prompts_of(MathPrompts(math_config(tmp_path, eval_fraction=0.25))
                      .prompts(0, 30, "train")[0]) == train  # same seed, same order
    other = prompts_of(MathPrompts(math_config(tmp_path, seed=1, eval_fraction=0.25))
                       .prompts(0, 30, "train")[0])
    assert other != train
    second_epoch = prompts_of(source.prompts(30, 30, "train")[0])
    assert set(second_epoch) == set(train) and second_epoch != train  # reshuffled per epoch


def test_eval_file_and_missing_eval_split(tmp_path):
    eval_path = write_problems(tmp_path / "eval.jsonl", 5, offset=90)
    source = MathPrompts(math_config(tmp_path, eval_data_path=eval_path))
    assert set(prompts_of(source.prompts(0, 5, "eval")[0])) == {f"what is {i} ?" for i in range(90, 95)}
    assert len(set(prompts_of(source.prompts(0, 40, "train")[0]))) == 40
    with pytest.raises(ValueError, match="no 'eval' split"):
        MathPrompts(math_config(tmp_path)).prompts(0, 1, "eval")


def test_chat_template_wraps_text_prompts_only_when_asked(tmp_path):
    plain = MathPrompts(math_config(tmp_path))
    chat = MathPrompts(math_config(tmp_path, apply_chat_template=True))
    problem, ids = plain.prompts(0, 1, "train")
    _, chat_ids = chat.prompts(0, 1, "train")
    text = problem[0].prompt
    assert ids[0] == plain.tokenizer.encode(text)
    assert chat_ids[0] == plain.tokenizer.encode(f"< user > {text} < assistant >")


def test_config_refuses_math_eval_without_held_out_problems():
    cfg = RunConfig()
    cfg.task.task, cfg.task.data_path, cfg.task.tokenizer = "math", "x.jsonl", "tok"
    cfg.train.eval_interval = 2
    with pytest.raises(ValueError, match="--eval-data-path FILE or --eval-fraction"):
        cfg.validate()
    cfg.task.eval_fraction = 0.1
    cfg.validate()


# ------------------------------------------------------------------ driver side, fake engine
class FakeEngine:
    """Answers ``prompt + [3 + i % 5, eos]``; after handing over sample 0 it waits until that
    sample has been scored, so the batch cannot finish before scoring has started."""

    layers, top_k = 2, 2

    def __init__(self, eos):
        self.eos = eos
        self.prompts = []
        self.route_requests = []

    def sample(self, i, prompt):
        tokens = torch.tensor([*prompt, 3 + i % 5, self.eos])
        routes = (torch.arange((len(tokens) - 1) * self.layers * self.top_k) + i) % 8
        return Sample(tokens, len(prompt), torch.full((2,), -0.1 * i),
                      routes.view(-1, self.layers, self.top_k).to(torch.uint8))

    def generate(self, prompts, sampling, *, return_logprobs=True, return_routed_experts=True,
                 on_sample=None):
        self.prompts.append([list(p) for p in prompts])
        self.route_requests.append(return_routed_experts)
        samples = [self.sample(i, list(p)) for i, p in enumerate(prompts)]
        for i, sample in enumerate(samples):
            if on_sample is not None:
                on_sample(i, sample)
            if i == 0:
                deadline = time.monotonic() + 60  # generous: a loaded CI machine
                while samples[0].reward is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert samples[0].reward is not None, "sample 0 was not scored during generation"
                self.scored_before_end = True
        return samples


def digit_config(batch_prompts=2, n=2):
    cfg = RunConfig()
    cfg.rollout.rollout_batch_prompts, cfg.rollout.n_samples_per_prompt = batch_prompts, n
    return cfg


def expected_rewards(cfg, engine_prompts):
    prompts = DigitPrompts(cfg)
    problems = prompts.task.problems(0, 100, "train")
    by_prompt = {tuple(prompts.prompts(i, 1, "train")[1][0]): p for i, p in enumerate(problems)}
    return [prompts.reward(by_prompt[tuple(p)], [3 + i % 5, prompts.tokenizer.eos_id])
            for i, p in enumerate(engine_prompts)]


def collect_two_batches(rank, dp):
    cfg = digit_config()
    prompts = DigitPrompts(cfg)
    engine = FakeEngine(prompts.tokenizer.eos_id) if rank == 0 else None
    source = RolloutSource(cfg, engine, prompts, dp=dp(rank))
    first = source.collect(1)
    second = source.collect(2)
    return first, second, source.data_position, engine.prompts if engine else None


def _collect_with_and_without_dp(rank):
    import torch.distributed as dist

    from megatron_pr2.platform.distributed import init_process_group

    init_process_group("cpu")
    try:
        return collect_two_batches(rank, _dp_by_rank), collect_two_batches(rank, _no_dp)
    finally:
        dist.destroy_process_group()


def _dp_by_rank(rank):
    return (2, rank)


def _no_dp(rank):
    return (1, 0)


def test_driver_scores_while_generating_and_the_data_position_advances(megatron_single_process):
    (samples, metrics), _, position, engine_prompts = collect_two_batches(0, _no_dp)
    assert position == 4
    assert [s.reward for s in samples] == expected_rewards(digit_config(), engine_prompts[0])
    assert metrics["rollout/reward_mean"] == pytest.approx(
        sum(s.reward for s in samples) / len(samples))
    assert all(s.status is SampleStatus.COMPLETED and "scored_at" in s.metadata for s in samples)
    assert [s.metadata["group"] for s in samples] == [0, 0, 1, 1]
    assert engine_prompts[1] != engine_prompts[0]  # the second batch reads the next prompts


def test_resumed_source_continues_from_the_saved_data_position(megatron_single_process):
    cfg = digit_config()
    prompts = DigitPrompts(cfg)
    reference = RolloutSource(cfg, FakeEngine(prompts.tokenizer.eos_id), prompts)
    reference.collect(1)
    reference.collect(2)
    resumed = RolloutSource(cfg, FakeEngine(prompts.tokenizer.eos_id), prompts)
    resumed.data_position = 2
    resumed.collect(2)
    assert resumed.engine.prompts[0] == reference.engine.prompts[1]


def test_each_data_parallel_rank_receives_only_its_own_routes():
    both = run_distributed(_collect_with_and_without_dp, 2)
    results = [with_dp for with_dp, _ in both]
    driver_prompts = results[0][3]
    reference = FakeEngine(DigitPrompts(digit_config()).tokenizer.eos_id)
    for rank, (first, _, position, _) in enumerate(results):
        samples, metrics = first
        assert position == 4 and metrics == results[0][0][1]
        share = shard_for_dp(4, 2, rank)
        for i, sample in enumerate(samples):
            want = reference.sample(i, driver_prompts[0][i])
            assert torch.equal(sample.tokens, want.tokens)
            if i in share:
                assert torch.equal(sample.routed_experts, want.routed_experts)
                assert torch.equal(sample.rollout_log_probs, want.rollout_log_probs)
            else:
                assert sample.routed_experts is None and sample.rollout_log_probs is None
                assert sample.metadata["dp_remote"]
        assert [s.reward for s in samples] == expected_rewards(digit_config(), driver_prompts[0])
    # ranks of one data-parallel rank (e.g. TP=2) all receive the whole batch
    results = [without_dp for _, without_dp in both]
    for samples, _ in (results[0][0], results[1][0]):
        assert all(s.routed_experts is not None for s in samples)
    assert [s.tokens.tolist() for s in results[1][0][0]] == [s.tokens.tolist() for s in results[0][0][0]]


@pytest.mark.parametrize("method,wants_routes", [
    ("none", False), ("r2", False), ("r3", True), ("pr2", False), ("pr2-engine", True),
    ("pr2-lookahead", False), ("current-route", False)])
def test_routes_are_requested_only_by_methods_that_replay_the_engines(
        megatron_single_process, method, wants_routes):
    cfg = digit_config()
    cfg.algo.routing_method = method
    prompts = DigitPrompts(cfg)
    engine = FakeEngine(prompts.tokenizer.eos_id)
    RolloutSource(cfg, engine, prompts).collect(1)
    assert engine.route_requests == [wants_routes]


def _collect_one_stage_each(rank):
    import torch.distributed as dist

    from megatron_pr2.platform.distributed import init_process_group

    init_process_group("cpu")
    try:
        cfg = digit_config()
        prompts = DigitPrompts(cfg)
        engine = FakeEngine(prompts.tokenizer.eos_id) if rank == 0 else None
        source = RolloutSource(cfg, engine, prompts, route_slots=(rank,))  # PP=2: layer slot r
        samples, _ = source.collect(1)
        return samples, engine.prompts if engine else None
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_each_pipeline_stage_receives_only_its_layers_routes():
    results = run_distributed(_collect_one_stage_each, 2)
    driver_prompts = results[0][1][0]
    reference = FakeEngine(DigitPrompts(digit_config()).tokenizer.eos_id)
    for rank, (samples, _) in enumerate(results):
        for i, sample in enumerate(samples):
            want = reference.sample(i, driver_prompts[i]).routed_experts[:, [rank]]
            assert torch.equal(sample.routed_experts, want), (rank, i)


def test_only_the_driver_may_hold_no_engine(megatron_single_process):
    with pytest.raises(ValueError, match="rank 0.*needs a rollout engine"):
        RolloutSource(digit_config(), None, DigitPrompts(digit_config()))


def test_scoring_runs_in_worker_threads(megatron_single_process):
    cfg = digit_config()
    prompts = DigitPrompts(cfg)
    threads = set()
    original = prompts.reward

    def reward(problem, ids):
        threads.add(threading.current_thread().name)
        return original(problem, ids)

    prompts.reward = reward
    RolloutSource(cfg, FakeEngine(prompts.tokenizer.eos_id), prompts).collect(1)
    assert threads and all(name.startswith("reward") for name in threads)
