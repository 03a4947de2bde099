"""Resume config checks: meaningless changes refused and listed, the others applied, new LR kept."""

import logging

import pytest
import torch

from megatron_pr2.config import RunConfig
from megatron_pr2.training.checkpoint.resume_config import (
    ResumeConfigError,
    check_resume_config,
    config_changes,
    configured_learning_rates,
    restore_learning_rates,
)


def _config(**changes) -> dict:
    cfg = RunConfig()
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg.to_dict()


def test_changes_are_listed_field_by_field_and_new_fields_are_ignored():
    saved = _config()
    saved["train"].pop("keep_last")  # a checkpoint written before the flag existed
    current = _config(train__lr=2e-4, train__keep_last=3)
    assert config_changes(saved, current) == {"train.lr": (1e-4, 2e-4)}


def test_model_routing_and_layout_changes_are_refused_together():
    saved = _config()
    current = _config(algo__routing_method="none", model__hf_config="tiny-qwen2-moe",
                      parallel__expert_model_parallel_size=2, train__lr=5.0)
    with pytest.raises(ResumeConfigError) as err:
        check_resume_config(saved, current, "/ckpt/iter_0000004")
    text = str(err.value)
    assert text.startswith("cannot resume /ckpt/iter_0000004")
    assert "--routing-method 'pr2' -> 'none' (the routing method)" in text
    assert "--hf-config 'tiny-qwen3-moe' -> 'tiny-qwen2-moe' (the model)" in text
    assert "--expert-model-parallel-size 1 -> 2 (the parallel layout" in text
    assert "--lr" not in text


def test_layout_change_is_applied_when_resharding_is_intended(caplog):
    saved, current = _config(), _config(parallel__expert_model_parallel_size=2)
    with caplog.at_level(logging.INFO, logger="megatron_pr2"):
        changes = check_resume_config(saved, current, "c", allow_resharding=True)
    assert changes == {"parallel.expert_model_parallel_size": (1, 2)}
    assert "--expert-model-parallel-size changed 1 -> 2 (applied)" in caplog.text


def test_distributed_optimizer_state_reshards_only_over_data_parallel_ranks():
    saved = _config(train__use_distributed_optimizer=True)
    for field, value in [("expert_model_parallel_size", 2), ("tensor_model_parallel_size", 2),
                         ("pipeline_model_parallel_size", 2)]:
        current = _config(train__use_distributed_optimizer=True, **{f"parallel__{field}": value})
        with pytest.raises(ResumeConfigError, match="reshards only over data-parallel ranks"):
            check_resume_config(saved, current, "c", allow_resharding=True)
    # sequence parallelism leaves every parameter (and grad buffer) as it is
    current = _config(train__use_distributed_optimizer=True, parallel__sequence_parallel=True)
    assert check_resume_config(saved, current, "c", allow_resharding=True)


def test_the_optimizer_state_s_format_may_not_change():
    with pytest.raises(ResumeConfigError) as err:
        check_resume_config(_config(), _config(train__use_distributed_optimizer=True,
                                               train__bf16=True), "c")
    assert "--use-distributed-optimizer False -> True (the optimizer state's format" in str(err.value)
    assert "--bf16 False -> True (the optimizer state's format" in str(err.value)


def test_safe_changes_are_logged_and_others_warned(caplog):
    saved = _config()
    current = _config(train__lr=3e-4, train__save_interval=5, rollout__temperature=0.7)
    with caplog.at_level(logging.INFO, logger="megatron_pr2"):
        check_resume_config(saved, current, "c")
    records = {r.getMessage(): r.levelno for r in caplog.records}
    assert records["resume: --lr changed 0.0001 -> 0.0003 (applied)"] == logging.INFO
    assert records["resume: --save-interval changed 0 -> 5 (applied)"] == logging.INFO
    warned = [m for m, level in records.items() if level == logging.WARNING]
    assert warned == [("resume: --temperature changed 1.0 -> 0.7 (applied; the resumed run is "
                       "no longer the same experiment as the checkpoint's)")]


def test_predictor_lr_mult_may_not_cross_one():
    check_resume_config(_config(predictor__predictor_lr_mult=0.5),
                        _config(predictor__predictor_lr_mult=0.1), "c")
    with pytest.raises(ResumeConfigError, match="parameter groups"):
        check_resume_config(_config(), _config(predictor__predictor_lr_mult=0.1), "c")


def test_learning_rates_of_the_new_config_survive_an_optimizer_state_load():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    old = torch.optim.Adam([{"params": [params[0]], "lr": 1e-3, "max_lr": 1e-3},
                            {"params": [params[1]], "lr": 1e-4, "max_lr": 1e-4}])
    new = torch.optim.Adam([{"params": [params[0]], "lr": 5e-3, "max_lr": 5e-3},
                            {"params": [params[1]], "lr": 5e-4, "max_lr": 5e-4}])
    configured = configured_learning_rates(new)
    new.load_state_dict(old.state_dict())
    assert [g["lr"] for g in new.param_groups] == [1e-3, 1e-4]  # what torch does by itself
    restore_learning_rates(new, configured)
    assert [(g["lr"], g["max_lr"]) for g in new.param_groups] == [(5e-3, 5e-3), (5e-4, 5e-4)]
    with pytest.raises(ResumeConfigError, match="2 parameter groups"):
        restore_learning_rates(new, configured[:1])


@pytest.mark.parametrize("saved_keys,builds,needle", [
    (["decoder.layers.0.mlp.router.predictor.weight"], False,
     "holds PR2 predictor weights, but this run's routing method builds no predictor"),
    (["decoder.layers.0.mlp.router.weight"], True,
     "has no PR2 predictor weights, but this run's routing method builds a predictor"),
])
def test_resume_refuses_a_checkpoint_whose_predictor_the_model_lacks(saved_keys, builds, needle):
    from megatron_pr2.training.checkpoint.resume_config import check_predictor_presence

    with pytest.raises(ResumeConfigError, match=needle) as err:
        check_predictor_presence(saved_keys, builds, "/ckpt/iter_0000002")
    assert str(err.value).startswith("cannot resume /ckpt/iter_0000002")
    assert "--load" in str(err.value)
    check_predictor_presence(saved_keys, not builds, "/ckpt/iter_0000002")  # matching: accepted


def test_a_resumed_schedule_sets_each_group_s_lr_at_its_restored_step():
    """Warm-up over 4 steps from 0 to each group's max_lr: after a load at step 2 the groups run
    at half their configured peak (the new --lr's), not at step 0's lr of 0 nor the saved one."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class Scheduled:  # the shape of ScheduledOptimizer: param_groups plus its scheduler
        def __init__(self, peak):
            params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
            self.optimizer = torch.optim.Adam([
                {"params": [params[0]], "max_lr": peak, "min_lr": 0.0},
                {"params": [params[1]], "max_lr": 10 * peak, "min_lr": 0.0}])
            self.scheduler = OptimizerParamScheduler(
                self.optimizer, init_lr=0.0, max_lr=peak, min_lr=0.0, lr_warmup_steps=4,
                lr_decay_steps=8, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                wd_incr_steps=1, wd_incr_style="constant")

        @property
        def param_groups(self):  # a load replaces the optimizer's list
            return self.optimizer.param_groups

    old, new = Scheduled(1e-3), Scheduled(3e-3)
    old.scheduler.step(increment=2)
    configured = configured_learning_rates(new)
    assert [g["lr"] for g in new.param_groups] == [0.0, 0.0]  # step 0 of the warm-up
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.scheduler.load_state_dict(old.scheduler.state_dict())
    restore_learning_rates(new, configured)
    assert new.scheduler.num_steps == 2
    assert [g["max_lr"] for g in new.param_groups] == [3e-3, 3e-2]
    assert [g["lr"] for g in new.param_groups] == pytest.approx([1.5e-3, 1.5e-2], rel=1e-12)
