"""The RL trainer with the RSPO router-shift weight (tiny model, 2 iterations, CPU)."""

import pytest

from tests.e2e.test_train_methods import _train_worker
from tests.multiproc import run_distributed

GAMMA = "train/rspo_gamma_mean"


RSPO_RUN = {
    "algo.rspo": True,
    "algo.rspo_gamma_min": 0.8,
    "train.lr": 1e-2,  # large enough that the routers move within one rollout batch
    # one-digit problems and a short warm-up: some rewards > 0, so the policy gradient is not 0
    "task.task_min_len": 1,
    "task.task_max_len": 1,
    "train.warmup_sft_steps": 40,
    "train.warmup_sft_lr": 3e-3,
}


def test_rspo_gamma_is_one_at_ministep1_and_logged(tmp_path):
    records = run_distributed(_train_worker, 1, "r2", {}, str(tmp_path), RSPO_RUN)[0]
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
