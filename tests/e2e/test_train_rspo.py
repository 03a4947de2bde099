"""The RL trainer with the RSPO router-shift weight (tiny model, 2 iterations, CPU)."""

import pytest

from tests.multiproc import run_distributed

GAMMA = "train/rspo_gamma_mean"


def _rspo_worker(rank, method, out_dir):
    from megatron_pr2.config import RunConfig
    from megatron_pr2.train import run_training
    from megatron_pr2.training.metrics_log import read_jsonl

    cfg = RunConfig()
    cfg.algo.routing_method = method
    cfg.algo.rspo = True
    cfg.algo.rspo_gamma_min = 0.8
    cfg.algo.off_policy_window = 2
    cfg.rollout.rollout_batch_prompts = 4
    cfg.rollout.n_samples_per_prompt = 2
    cfg.rollout.max_new_tokens = 6
    cfg.train.train_iters = 2
    cfg.train.micro_batch_size = 2
    cfg.train.lr = 1e-2  # large enough that the routers move within one rollout batch
    # one-digit problems and a short warm-up: some rewards > 0, so the policy gradient is not 0
    cfg.task.task_min_len = cfg.task.task_max_len = 1
    cfg.train.warmup_sft_steps = 40
    cfg.train.warmup_sft_lr = 3e-3
    cfg.train.log_jsonl = f"{out_dir}/metrics.jsonl"
    run_training(cfg.validate())
    return read_jsonl(cfg.train.log_jsonl) if rank == 0 else None


def test_rspo_gamma_is_one_at_ministep1_and_logged(tmp_path):
    records = run_distributed(_rspo_worker, 1, "r2", str(tmp_path))[0]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for key in (GAMMA, "train/rspo_gamma_below_min_fraction", f"{GAMMA}/ministep1",
                    f"{GAMMA}/ministep2"):
            assert key in record, key
        # mini-step 1 replays the old pass's routes with the old pass's weights: no router shift
        assert record[f"{GAMMA}/ministep1"] == 1.0
        assert record["train/rspo_gamma_below_min_fraction/ministep1"] == 0.0
        assert 0.0 < record[f"{GAMMA}/ministep2"] <= 1.0
        assert record[GAMMA] == pytest.approx(
            (record[f"{GAMMA}/ministep1"] + record[f"{GAMMA}/ministep2"]) / 2)
    # once the weights have moved (Adam keeps moving them), the router log-probs at the old
    # routes shift and gamma drops below 1
    assert min(r[f"{GAMMA}/ministep2"] for r in records) < 1.0
