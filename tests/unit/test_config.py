"""The trainer's command line: Megatron-LM flag names, YAML files, clear refusals."""

import pytest

from megatron_pr2.config import parse_config


def test_flags_and_yaml_sections_with_flags_winning(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  expert_model_parallel_size: 2\nlr: 0.5\ntrain_iters: 7\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.25", "--routing-method", "r3"])
    assert cfg.parallel.expert_model_parallel_size == 2
    assert cfg.train.train_iters == 7
    assert cfg.train.lr == 0.25  # the command line wins over the file
    assert cfg.algo.routing_method == "r3"


@pytest.mark.parametrize("argv,message", [
    (["--routing-method", "r4"], "--routing-method must be one of none, r2, r3, pr2, pr2-engine"),
    (["--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
    (["--off-policy-window", "3"], "--off-policy-window x --micro-batch-size = 1 x 3 x 4 = 12"),
    (["--rspo", "--routing-method", "none"], "--rspo needs the mini-steps to replay the old routes"),
    (["--rspo", "--routing-method", "r2", "--pipeline-model-parallel-size", "2"],
     "--rspo needs --pipeline-model-parallel-size 1"),
    (["--rspo", "--routing-method", "r3", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], "--rspo cannot be used with --sequence-parallel"),
    (["--rollout-engine", "sglang"], "needs --sglang-urls"),
    (["--lr-decay-style", "linear", "--lr-warmup-iters", "6", "--lr-decay-iters", "6"],
     "--lr-decay-style linear: --lr-decay-iters = 6 must exceed --lr-warmup-iters (6)"),
    (["--lr-decay-style", "cosine", "--lr-warmup-iters", "40", "--train-iters", "10",
      "--off-policy-window", "4", "--micro-batch-size", "1"],  # 10 x 4 = 40 optimizer steps
     "--lr-decay-style cosine: the run's optimizer steps (--train-iters x --off-policy-window) "
     "= 40 must exceed --lr-warmup-iters (40)"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters must be >= 1"),
])
def test_bad_settings_name_the_problem(argv, message):
    with pytest.raises(ValueError) as err:
        parse_config(argv)
    assert message in str(err.value)


def test_constant_lr_accepts_any_decay_steps_and_decay_defaults_to_the_whole_run():
    cfg = parse_config(["--lr-warmup-iters", "10", "--lr-decay-iters", "5"])  # decay unused
    assert cfg.train.lr_decay_steps(cfg.optimizer_steps) == 5
    cfg = parse_config(["--lr-decay-style", "cosine", "--train-iters", "6", "--off-policy-window",
                        "2", "--micro-batch-size", "2", "--lr-warmup-iters", "11"])
    assert cfg.optimizer_steps == 6 * 2
    assert cfg.train.lr_decay_steps(cfg.optimizer_steps) == 12


def test_unknown_yaml_setting_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("method", ["r2", "r3", "pr2", "pr2-engine"])
def test_rspo_is_accepted_with_replayed_routes(method):
    cfg = parse_config(["--rspo", "--rspo-gamma-min", "0.7", "--routing-method", method])
    assert cfg.algo.rspo and cfg.algo.rspo_gamma_min == 0.7


def test_routing_method_rows_and_the_optimizer_predictor_variant():
    from megatron_pr2.routing import strategies
    from megatron_pr2.routing.methods import routing_method

    lookahead = routing_method("pr2-lookahead")
    assert isinstance(lookahead.old_pass, strategies.LookaheadPass)
    assert isinstance(lookahead.replay, strategies.OldPassReplay)
    assert lookahead.old_pass.mode == "record" and lookahead.ministep_mode == "replay"
    assert not lookahead.trains_predictor and lookahead.replays
    assert isinstance(routing_method("current-route").replay, strategies.CurrentRouteReplay)
    assert routing_method("r3").uses_engine_routes and not routing_method("r2").uses_engine_routes
    assert routing_method("none").ministep_mode == "live"
    optimizer = routing_method("pr2", "optimizer")
    assert optimizer.predictor == "optimizer" and not optimizer.trains_predictor
    assert isinstance(optimizer.old_pass, strategies.OptimizerPredictorPass)
    assert "--use-distributed-optimizer" in optimizer.optimizer_problem(True)
    assert optimizer.optimizer_problem(False) is None
    assert routing_method("pr2").optimizer_problem(True) is None
    assert routing_method("pr2").predictor == "learned" and routing_method("pr2").trains_predictor
    with pytest.raises(ValueError, match="variant of --routing-method pr2, not r2"):
        routing_method("r2", "optimizer")


@pytest.mark.parametrize("change, message", [
    ({"replay": "old_pass"}, "old_pass must be an OldPass and replay a Replay"),
    ({"old_pass": "record"}, "old_pass must be an OldPass and replay a Replay"),
    ({"name": "r3-old", "method": "r3", "replay": "OldPassReplay"},
     "r3-old: an old pass in replay mode replays the engine's routes"),
    ({"name": "live-r2", "method": "none", "replay": "OldPassReplay"},
     "live-r2: the mini-steps replay the old pass's routes, which live mode does not record"),
    ({"name": "live-cur", "method": "none", "replay": "CurrentRouteReplay"},
     "which live mode does not record"),
    ({"name": "p", "old_pass": "RouterModePass:predict"}, "p: an old pass in predict mode needs"),
    ({"name": "o", "predictor": "optimizer"}, "o: the optimizer predictor and OptimizerPred"),
])
def test_invalid_method_rows_fail_when_built(change, message):
    """Each rule of ``RoutingMethod`` refuses its row at construction, naming the method."""
    import dataclasses

    from megatron_pr2.routing import strategies
    from megatron_pr2.routing.methods import routing_method

    change = dict(change)
    row = routing_method(change.pop("method", "r2"))
    for field in ("old_pass", "replay"):
        value = change.get(field)
        if isinstance(value, str) and hasattr(strategies, value.split(":")[0]):
            kind, _, mode = value.partition(":")
            change[field] = getattr(strategies, kind)(mode) if mode else getattr(strategies, kind)()
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(row, **change)


def test_router_mode_pass_names_a_bad_mode():
    from megatron_pr2.routing.strategies import RouterModePass

    with pytest.raises(ValueError, match="router mode must be one of .* got 'recrod'"):
        RouterModePass("recrod")


def test_only_methods_that_use_the_predictor_build_it():
    import dataclasses

    from megatron_pr2.routing.methods import ROUTING_METHODS, routing_method

    built = {name for name, row in ROUTING_METHODS.items() if row.builds_predictor}
    assert built == {"pr2", "pr2-engine"}
    assert routing_method("pr2", "optimizer").builds_predictor  # W_p set from Adam's step
    # docs/architecture.md's example row: trains W_p on engine routes, the engine's gate unchanged
    r3_pr2 = dataclasses.replace(routing_method("r3"), name="r3-pr2", predictor="learned")
    assert r3_pr2.builds_predictor and r3_pr2.trains_predictor and not r3_pr2.predictive_engine_gate
    with pytest.raises(ValueError, match="r3-gate: the predictive engine gate folds in a learned"):
        dataclasses.replace(routing_method("r3"), name="r3-gate", predictive_engine_gate=True)
    with pytest.raises(ValueError, match="--predictor must be one of"):
        routing_method("pr2", "linear")


def test_lookahead_flags_are_checked():
    from megatron_pr2.config import parse_config

    cfg = parse_config(["--routing-method", "pr2-lookahead", "--lookahead-scale", "0.5"])
    assert cfg.algo.lookahead_scale == 0.5
    with pytest.raises(ValueError, match="--lookahead-scale must be >= 0"):
        parse_config(["--lookahead-scale", "-1"])
    with pytest.raises(ValueError, match="variant of --routing-method pr2"):
        parse_config(["--routing-method", "r3", "--predictor", "optimizer"])
    distributed = parse_config(["--routing-method", "pr2-lookahead",
                                "--use-distributed-optimizer"])  # u per owned shard
    assert distributed.train.use_distributed_optimizer
    with pytest.raises(ValueError, match="--predictor optimizer .* --use-distributed-optimizer"):
        parse_config(["--routing-method", "pr2", "--predictor", "optimizer",
                      "--use-distributed-optimizer"])
