"""PR2 predict mode and the evolution predictor, against hand computations and R2."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_pr2.routing.controller import RoutingController
from megatron_pr2.routing.predictor import PredictorConfig
from megatron_pr2.routing.router import RouteError
from tests.megatron.test_router_replay import build, tokens_and_positions


def _logprobs(logits, tokens):
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(
        -1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _pass(model, controller, mode, tokens, plan=None, train_predictor=False, grad=False, mb=0):
    """One forward (and backward of a policy-gradient-like loss when ``grad``)."""
    tokens, positions = tokens
    controller.begin_step(mode, plan=plan, train_predictor=train_predictor)
    controller.set_microbatch(mb)
    with torch.set_grad_enabled(grad):
        logp = _logprobs(model(tokens, positions, None), tokens)
        if grad:
            (-(logp * torch.linspace(-1, 1, logp.numel()).view_as(logp))).mean().backward()
    return logp.detach(), controller.end_step()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None and "predictor" not in n}


def _drift_routers(models, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    for layer in models[0].decoder.layers:
        noise = torch.randn(layer.mlp.router.weight.shape, generator=gen) * scale
        for model in models:
            model.decoder.layers[layer.layer_number - 1].mlp.router.weight.data.add_(noise)


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_pr2_with_zero_predictor_is_bitwise_r2(megatron_single_process, name):
    _, r2_model = build(name, seed=11)
    _, pr2_model = build(name, seed=11)
    for (n, a), b in zip(r2_model.state_dict().items(), pr2_model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
    r2, pr2 = RoutingController(r2_model), RoutingController(pr2_model)
    batch = tokens_and_positions(seed=12, s=8, b=2)

    old_r2, rec_r2 = _pass(r2_model, r2, "record", batch)
    old_pr2, rec_pr2 = _pass(pr2_model, pr2, "predict", batch)
    assert torch.equal(old_r2, old_pr2)
    assert rec_r2.routes.routes.keys() == rec_pr2.routes.routes.keys()
    for key, routes in rec_r2.routes.routes.items():
        assert torch.equal(routes.expert_ids, rec_pr2.routes.get(*key).expert_ids), key

    # mini-step 1: replay, no predictor loss
    new_r2, _ = _pass(r2_model, r2, "replay", batch, plan=rec_r2.routes, grad=True)
    new_pr2, _ = _pass(pr2_model, pr2, "replay", batch, plan=rec_pr2.routes, grad=True)
    assert torch.equal(new_r2, old_r2) and torch.equal(new_r2, new_pr2)
    grads_r2, grads_pr2 = _grads(r2_model), _grads(pr2_model)
    assert grads_r2.keys() == grads_pr2.keys() and any("router.weight" in n for n in grads_r2)
    for n in grads_r2:
        assert torch.equal(grads_r2[n], grads_pr2[n]), n

    # mini-step 2 after the same router drift: the predictor loss reaches W_p only
    for model in (r2_model, pr2_model):
        model.zero_grad(set_to_none=True)
    _drift_routers([r2_model, pr2_model], seed=13, scale=0.02)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    new_r2, _ = _pass(r2_model, r2, "replay", batch, plan=rec_r2.routes, grad=True)
    new_pr2, step = _pass(pr2_model, pr2, "replay", batch, plan=rec_pr2.routes, grad=True,
                          train_predictor=True)
    assert torch.equal(new_r2, new_pr2)
    grads_r2, grads_pr2 = _grads(r2_model), _grads(pr2_model)
    for n in grads_r2:
        assert torch.equal(grads_r2[n], grads_pr2[n]), n
    for layer in pr2_model.decoder.layers:
        assert layer.mlp.router.predictor.weight.grad.abs().sum() > 0
    assert all(m.summary()["predictor_loss"] > 0 for m in step.metrics.values())
    # without the predictor loss W_p's gradient is zero (kept in the graph for Megatron's DDP)
    assert all(p.grad is None or not p.grad.any()
               for n, p in r2_model.named_parameters() if "predictor" in n)


def _capture_router_inputs(model):
    captured = {}
    handles = [layer.mlp.router.register_forward_pre_hook(
        lambda mod, args: captured.setdefault(mod.layer_number, []).append(args[0].detach().clone()))
        for layer in model.decoder.layers]
    return captured, handles


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe"])
def test_predictive_routes_are_topk_of_logits_plus_predictor(megatron_single_process, name,
                                                             dispatcher):
    config, model = build(name, seed=21, moe_token_dispatcher_type=dispatcher)
    gen = torch.Generator().manual_seed(22)
    for layer in model.decoder.layers:
        layer.mlp.router.predictor.weight.data.normal_(0.0, 0.05, generator=gen)
    controller = RoutingController(model)
    captured, handles = _capture_router_inputs(model)
    tokens, positions = tokens_and_positions(seed=23)
    controller.begin_step("predict")
    controller.set_microbatch(3)
    with torch.no_grad():
        logits_model = model(tokens, positions, None)
    routes = controller.end_step().routes
    for handle in handles:
        handle.remove()
    changed = 0
    for layer in model.decoder.layers:
        h = captured[layer.layer_number][0].reshape(-1, config.hidden_size)
        p = h @ layer.mlp.router.weight.T
        predicted = (p + h @ layer.mlp.router.predictor.weight.T).topk(2, dim=-1).indices
        got = routes.get(3, layer.layer_number).expert_ids.long()
        assert torch.equal(got.sort(-1).values, predicted.sort(-1).values), layer.layer_number
        changed += int((got.sort(-1).values != p.topk(2, dim=-1).indices.sort(-1).values).any(-1).sum())
    assert changed > 0, "the predictor should move some routes away from TopK(p)"

    # the predict pass gates the predicted route with the current scores: replaying it at the
    # same weights reproduces the predict pass exactly
    controller.begin_step("replay", plan=routes)
    controller.set_microbatch(3)
    with torch.no_grad():
        replayed = model(tokens, positions, None)
    controller.end_step()
    assert torch.equal(logits_model, replayed)


def test_predictor_loss_and_gradient_equal_hand_kl(megatron_single_process):
    config, model = build(seed=31)
    gen = torch.Generator().manual_seed(32)
    for layer in model.decoder.layers:
        layer.mlp.router.predictor.weight.data.normal_(0.0, 0.02, generator=gen)
    controller = RoutingController(model, PredictorConfig(loss="kl-post"))
    tokens = tokens_and_positions(seed=33)
    captured, handles = _capture_router_inputs(model)
    _, predicted = _pass(model, controller, "predict", tokens)
    h_old = {n: v[0].reshape(-1, config.hidden_size) for n, v in captured.items()}
    p_old = {l.layer_number: h_old[l.layer_number] @ l.mlp.router.weight.T for l in model.decoder.layers}
    captured.clear()

    _drift_routers([model], seed=34, scale=0.03)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    _, step = _pass(model, controller, "replay", tokens, plan=predicted.routes, grad=True,
                    train_predictor=True)
    for handle in handles:
        handle.remove()
    for layer in model.decoder.layers:
        n = layer.layer_number
        router = layer.mlp.router
        h_cur = captured[n][0].reshape(-1, config.hidden_size)
        q = torch.softmax(h_cur @ router.weight.T, dim=-1)
        r = torch.softmax(p_old[n] + h_old[n] @ router.predictor.weight.T, dim=-1)
        kl = (q * (q.log() - r.log())).sum(-1)
        assert step.metrics[n].summary()["predictor_loss"] == pytest.approx(float(kl.mean()), rel=1e-4)
        hand_grad = (r - q).T @ h_old[n] / h_old[n].shape[0]
        torch.testing.assert_close(router.predictor.weight.grad, hand_grad, rtol=1e-4, atol=1e-7)


def test_predictor_inputs_are_subsampled_without_replacement(megatron_single_process):
    config, model = build(seed=41)
    controller = RoutingController(model, PredictorConfig(sample_ratio=0.25, seed=5))
    tokens = tokens_and_positions(seed=42, s=8, b=4)
    captured, handles = _capture_router_inputs(model)
    _pass(model, controller, "predict", tokens)
    for handle in handles:
        handle.remove()
    rows_seen = set()
    for layer in model.decoder.layers:
        sample = layer.mlp.router.replay_state.predictor_samples[0]
        rows = sample.token_rows
        assert rows.numel() == 8 and sample.num_rows == 32
        assert torch.equal(rows, rows.unique())  # sorted, distinct
        h = captured[layer.layer_number][0].reshape(-1, config.hidden_size)
        assert torch.equal(sample.hidden_TH, h[rows])
        torch.testing.assert_close(sample.logits_TE, h[rows] @ layer.mlp.router.weight.T)
        rows_seen.add(tuple(rows.tolist()))
    assert len(rows_seen) > 1, "layers should draw their own samples"
    with pytest.raises(ValueError, match=r"sample_ratio must be in \(0, 1\]"):
        PredictorConfig(sample_ratio=0.0)
    with pytest.raises(ValueError, match="cannot be trained in the pass that records its inputs"):
        controller.begin_step("predict", train_predictor=True)


def test_predictor_beats_zero_predictor_after_steps_on_a_fixed_drift(megatron_single_process):
    """Each rollout batch: predict at W_r, replay at W_r + D (D fixed), one predictor step."""
    _, model = build(seed=51)
    base = {l.layer_number: l.mlp.router.weight.detach().clone() for l in model.decoder.layers}
    gen = torch.Generator().manual_seed(52)
    drift = {n: torch.randn(w.shape, generator=gen) * w.std() * 1.5 for n, w in base.items()}
    predictors = [l.mlp.router.predictor.weight for l in model.decoder.layers]
    optimizer = torch.optim.Adam(predictors, lr=3e-3)
    controller = RoutingController(model, PredictorConfig(loss="kl-post"))
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    history = []
    for batch_index in range(25):
        tokens = tokens_and_positions(seed=100 + batch_index, s=16, b=4)
        for layer in model.decoder.layers:
            layer.mlp.router.weight.data.copy_(base[layer.layer_number])
        _, predicted = _pass(model, controller, "predict", tokens)
        for layer in model.decoder.layers:
            layer.mlp.router.weight.data.add_(drift[layer.layer_number])
        optimizer.zero_grad()
        model.zero_grad(set_to_none=True)
        _, step = _pass(model, controller, "replay", tokens, plan=predicted.routes, grad=True,
                        train_predictor=True)
        optimizer.step()
        summaries = [m.summary() for m in step.metrics.values()]
        history.append((sum(s["predictor_topk_acc"] for s in summaries) / len(summaries),
                        sum(s["zero_predictor_topk_acc"] for s in summaries) / len(summaries)))
    first_acc, first_zero = history[0]
    assert first_acc == first_zero  # W_p starts at zero
    last = history[-5:]
    acc = sum(a for a, _ in last) / len(last)
    zero = sum(z for _, z in last) / len(last)
    assert zero < 0.8, f"the drift should move routes (zero-predictor acc {zero:.2f})"
    assert acc > zero + 0.1, f"predictor acc {acc:.2f} vs zero predictor {zero:.2f}: {history}"


def test_router_without_predictor_refuses_pr2_but_replays(megatron_single_process):
    import functools

    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.models.presets import preset
    from megatron_pr2.routing.router import ReplayRouter

    _, _, model = build_model(preset("tiny-qwen3-moe"), options=ModelOptions(
        router_class=functools.partial(ReplayRouter, use_predictor=False)))
    assert not any("predictor" in key for key in model.state_dict())
    controller = RoutingController(model)
    with pytest.raises(ValueError, match="predict mode needs the evolution predictor"):
        controller.begin_step("predict")
    with pytest.raises(ValueError, match="predictor training needs the evolution predictor"):
        controller.begin_step("replay", plan=_recorded(model, controller),
                              train_predictor=True)


def _recorded(model, controller):
    _, step = _pass(model, controller, "record", tokens_and_positions(seed=90))
    return step.routes


def test_replayed_old_pass_can_record_predictor_inputs_for_r3_transport(megatron_single_process):
    """PR2 in the engine: the old-log-prob pass replays engine routes and records h, p."""
    config, model = build(seed=91)
    controller = RoutingController(model)
    batch = tokens_and_positions(seed=92)
    engine_routes = _recorded(model, controller)  # stands in for the engine's routes
    captured, handles = _capture_router_inputs(model)
    controller.begin_step("replay", plan=engine_routes, record_predictor_inputs=True)
    controller.set_microbatch(0)
    with torch.no_grad():
        model(*batch, None)
    controller.end_step()
    for handle in handles:
        handle.remove()
    for layer in model.decoder.layers:
        sample = layer.mlp.router.replay_state.predictor_samples[0]
        h = captured[layer.layer_number][0].reshape(-1, config.hidden_size)
        assert torch.equal(sample.hidden_TH, h)
    _drift_routers([model], seed=93, scale=0.03)
    _, step = _pass(model, controller, "replay", batch, plan=engine_routes, grad=True,
                    train_predictor=True)
    assert all(m.summary()["predictor_loss"] > 0 for m in step.metrics.values())
    # a micro-batch without recorded inputs is an error, not a silent skip
    plan = engine_routes.select([0])
    for key in list(plan.routes):
        plan.routes[(5, key[1])] = plan.routes.pop(key)
    with pytest.raises(RouteError, match="no predictor inputs were recorded for micro-batch 5"):
        _pass(model, controller, "replay", batch, plan=plan, grad=True, train_predictor=True, mb=5)
    controller.abort_step()
