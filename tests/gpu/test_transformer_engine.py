"""The TransformerEngine spec on a GPU: replayed routes reach the (grouped) experts unchanged in
forward and backward, and FP8 stays within tolerance of bf16 on the same weights and routes."""

import os

import pytest

from tests.gpu import test_train_gpu as trainer
from tests.multiproc import run_distributed

if os.environ.get("REQUIRE_TE") == "1":  # tools/gpu_smoke.sh: a missing TE fails, never skips
    import transformer_engine  # noqa: F401
else:
    pytest.importorskip("transformer_engine", reason="TransformerEngine is not installed")

B, S = 2, 64  # 128 router rows: a multiple of FP8 GEMM alignment
FP8_TOLERANCE = 0.15  # relative L2 error of the logits, e4m3 forward


def _fp8_support() -> tuple[bool, str]:
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError:
        from transformer_engine.pytorch.quantization import check_fp8_support
    return check_fp8_support()


def _forced_plan(controller, num_experts, top_k, rows, seed):
    import torch

    from megatron_pr2.routing.route_plan import LayerRoutes, RoutePlan

    gen = torch.Generator().manual_seed(seed)
    plan = RoutePlan()
    for layer in controller.layer_numbers():
        ids = torch.rand(rows, num_experts, generator=gen).argsort(-1)[:, :top_k]  # distinct
        plan.add(0, layer, LayerRoutes.from_expert_ids(ids, num_experts))
    return plan


def _replayed_pass(model, controller, plan, tokens, positions):
    """Forward + backward replaying ``plan``; what the routers returned and the experts saw."""
    import torch

    from megatron_pr2.routing.router import ReplayRouter

    seen, handles = {}, []
    for module in model.modules():
        if isinstance(module, ReplayRouter):
            handles.append(module.register_forward_hook(
                lambda mod, args, out: seen.setdefault(("map", mod.layer_number), out[1].detach())))
        if type(module).__name__ in ("TEGroupedMLP", "SequentialMLP", "GroupedMLP"):
            layer = module.layer_number if hasattr(module, "layer_number") else len(handles)
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, layer=layer: seen.setdefault(("count", layer),
                                                               args[1].detach().cpu())))
    model.zero_grad(set_to_none=True)
    controller.begin_step("replay", plan=plan)
    controller.set_microbatch(0)
    logits = model(tokens, positions, None)
    logits.float().square().mean().backward()
    routes = controller.end_step().routes
    for handle in handles:
        handle.remove()
    grads_finite = all(bool(torch.isfinite(p.grad).all())
                       for p in model.parameters() if p.grad is not None)
    return logits.detach().float(), routes, seen, grads_finite


def _te_worker(rank, fp8_format):
    import torch
    import torch.nn.functional as F

    from megatron_pr2.models import ModelOptions, build_model_chunks, parse_hf_config
    from megatron_pr2.models.presets import preset
    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel
    from megatron_pr2.routing.controller import RoutingController
    from megatron_pr2.routing.router import ReplayRouter

    initialize_model_parallel(ParallelConfig(), seed=0, device="cuda")
    spec = parse_hf_config(preset("tiny-qwen3-moe"))
    overrides = {"bf16": True, "params_dtype": torch.bfloat16,
                 "pipeline_dtype": torch.bfloat16, "moe_grouped_gemm": True}
    if fp8_format:
        overrides.update(fp8=fp8_format)
    _, config, chunks = build_model_chunks(spec, None, ModelOptions(
        router_class=ReplayRouter, use_transformer_engine=True, config_overrides=overrides))
    model = chunks[0]
    controller = RoutingController([model])
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (B, S), generator=gen).cuda()
    positions = torch.arange(S, device="cuda").expand(B, -1)
    plan = _forced_plan(controller, spec.num_experts, spec.top_k, S * B, seed=2)

    out = {"experts": sorted({type(m).__name__ for m in model.modules()
                              if "MLP" in type(m).__name__})}
    passes = {"fp8": None, "bf16": None} if fp8_format else {"bf16": None}
    for name in passes:
        config.fp8 = fp8_format if name == "fp8" else None
        logits, routes, seen, grads_finite = _replayed_pass(model, controller, plan, tokens,
                                                            positions)
        forced_equal, map_equal = True, True
        for layer in controller.layer_numbers():
            forced = plan.get(0, layer).expert_ids.long()
            forced_equal &= torch.equal(routes.get(0, layer).expert_ids.long().cpu(), forced)
            expected_map = F.one_hot(forced, spec.num_experts).sum(1).bool()
            map_equal &= torch.equal(seen[("map", layer)].bool().cpu(), expected_map)
        counts = [v for k, v in sorted(seen.items()) if k[0] == "count"]
        expected_counts = sorted(
            F.one_hot(plan.get(0, layer).expert_ids.long(), spec.num_experts).sum((0, 1)).tolist()
            for layer in controller.layer_numbers())
        passes[name] = {"logits": logits.cpu(), "forced_equal": forced_equal,
                        "map_equal": map_equal, "grads_finite": grads_finite,
                        "counts_equal": sorted(c.tolist() for c in counts) == expected_counts}
    out.update(passes)
    return out


@pytest.fixture(scope="module")
def bf16_run():
    return run_distributed(_te_worker, 1, None)[0]


def test_te_spec_replays_forced_routes_in_forward_and_backward(bf16_run):
    run = bf16_run["bf16"]
    assert run["forced_equal"], "the routes dispatched differ from the forced route plan"
    assert run["map_equal"], "the routing map the router returned is not the forced one"
    assert run["counts_equal"], "the experts did not receive the forced token counts"
    assert run["grads_finite"]
    assert bool(run["logits"].isfinite().all())


@pytest.mark.parametrize("fp8_format", ["hybrid"])
def test_te_fp8_within_tolerance_of_bf16(fp8_format):
    supported, reason = _fp8_support()
    if not supported:
        pytest.skip(f"FP8 is not supported on this GPU: {reason}")
    run = run_distributed(_te_worker, 1, fp8_format)[0]
    for name in ("fp8", "bf16"):
        assert run[name]["forced_equal"] and run[name]["map_equal"], name
        assert run[name]["counts_equal"] and run[name]["grads_finite"], name
    fp8, bf16 = run["fp8"]["logits"], run["bf16"]["logits"]
    error = float((fp8 - bf16).norm() / bf16.norm())
    assert 0.0 < error < FP8_TOLERANCE, f"FP8 vs bf16 relative logit error {error:.4f}"


@pytest.mark.parametrize("fp8_format", [None, "hybrid"])
def test_trainer_runs_the_te_spec(fp8_format, tmp_path):
    te_flags = ["--transformer-impl", "transformer_engine", "--moe-grouped-gemm"]
    trainer._require_flags("--bf16", "--transformer-impl", "--moe-grouped-gemm",
                           *(["--fp8-format"] if fp8_format else []))
    if fp8_format:
        supported, reason = _fp8_support()
        if not supported:
            pytest.skip(f"FP8 is not supported on this GPU: {reason}")
        te_flags += ["--fp8-format", fp8_format]
    argv = trainer._flags(str(tmp_path), "pr2") + te_flags
    records = run_distributed(trainer._train_worker, 1, argv)[0]
    trainer._check_records(records, "pr2")
    if not fp8_format:
        assert records[0][trainer.ZERO_DEV_STEP1] == 1.0
