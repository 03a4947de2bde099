"""In-memory weight sync from 2 gloo trainer processes into a real SGLang CPU server.

Layouts TP=2 + sequence parallel, EP=2 and PP=2 each push the trainer's weights (SGLang's
``/update_weights_from_distributed`` over gloo, small buckets) into one server that started
with *other* weights. References, computed here independently of the sync:

* the served tensors: checksums (``/weights_checker``) of tensors fused by hand from the
  single-process adapter output, in the server's dtype (SGLang fuses q/k/v and the experts);
* greedy tokens and routed experts: the in-process ``transformers`` engine loaded with the
  same single-process adapter output;
* PR2-in-engine mode: the gates are ``W_r + W_p^T`` with predictors set by the test.

Also on PP=2: a bf16 wire into the fp32 server, the disk transport, and the in-process engine
(buckets of stage 1 travel to rank 0).
"""

import hashlib

import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.platform import ParallelConfig
from megatron_pr2.rollout.sample import SamplingParams
from megatron_pr2.rollout.sglang_server import SGLangServer
from tests.integration.sglang_venv import VENV, requires_sglang_venv
from tests.multiproc import run_distributed

pytestmark = requires_sglang_venv

CFG = preset("tiny-qwen3-moe")
LAYOUTS = {
    "tp2-sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "ep2": ParallelConfig(expert_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}
PROMPTS = [[5, 7, 9, 11], [3, 4], [8, 9, 10, 11, 12, 13, 14], [30, 31, 32]]
GREEDY = SamplingParams(max_new_tokens=8, greedy=True)
BUCKET_BYTES = 96 << 10  # many buckets per sync


def predictor_weight(layer: int) -> torch.Tensor:
    """The PR2 predictor W_p [E, H] the test gives MoE layer ``layer``."""
    generator = torch.Generator().manual_seed(100 + layer)
    return 0.05 * torch.randn(CFG["num_experts"], CFG["hidden_size"], generator=generator)


def set_predictors(model) -> None:
    with torch.no_grad():
        for layer in model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                router.predictor.weight.copy_(predictor_weight(layer.layer_number - 1))


# ------------------------------------------------------------------------------ worker
def _served(engine):
    samples = engine.generate(PROMPTS, GREEDY)
    return engine_checksums(engine), [(s.tokens, s.routed_experts) for s in samples]


def engine_checksums(engine):
    from megatron_pr2.weight_sync import SGLangWeightAPI

    return SGLangWeightAPI(engine.addresses[0]).weight_checksums()


def _sync_layouts(rank, address, megatron_dir, disk_dir):
    from megatron_pr2.convert.loading import load_megatron_checkpoint
    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.platform import initialize_model_parallel
    from megatron_pr2.rollout.inprocess import InProcessEngine
    from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
    from megatron_pr2.routing.router import ReplayRouter
    from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

    results = {}
    for name, parallel in LAYOUTS.items():
        initialize_model_parallel(parallel)
        _, _, model = build_model(CFG, parallel, ModelOptions(router_class=ReplayRouter))
        load_megatron_checkpoint(model, megatron_dir)
        engine = SGLangClient.for_hf_config([address], CFG,
                                            config=SGLangClientConfig(request_timeout=120))

        def sync(predictive, engine=engine, model=model, **options):
            syncer = build_weight_syncer([model], engine, CFG,
                                         WeightSyncOptions(bucket_bytes=BUCKET_BYTES, **options))
            report = syncer.sync(predictive_gate=predictive)
            syncer.close()
            return report

        if name == "ep2":
            results[name, "rejected"] = _rejected_then_rebuilt(rank, model, engine)
        report = sync(False)
        results[name, "plain"] = (_served(engine) if rank == 0 else None, report.num_buckets)
        set_predictors(model)
        sync(True)
        results[name, "predictive"] = (_served(engine) if rank == 0 else None, None)
        if name != "pp2":
            continue
        sync(False, dtype="bf16")
        results[name, "bf16-wire"] = (engine_checksums(engine) if rank == 0 else None, None)
        sync(True, transport="disk", directory=disk_dir)
        results[name, "disk"] = (engine_checksums(engine) if rank == 0 else None, None)
        local = InProcessEngine(CFG)
        build_weight_syncer([model], local, CFG,
                            WeightSyncOptions(bucket_bytes=BUCKET_BYTES)).sync(predictive_gate=True)
        results[name, "inprocess"] = (local.model.state_dict() if rank == 0 else None, None)
    return results


def _rejected_then_rebuilt(rank, model, engine):
    """An update the server refuses (no session opened) fails on every rank with the server's
    message; the same syncer then builds a new group and syncs."""
    from megatron_pr2.weight_sync import (
        WeightSyncError,
        WeightSyncOptions,
        build_weight_syncer,
    )

    syncer = build_weight_syncer([model], engine, CFG, WeightSyncOptions(bucket_bytes=BUCKET_BYTES))
    if rank == 0:
        syncer.transport.open = lambda: None  # skip /begin_weight_update
    try:
        syncer.sync()
        message = None
    except WeightSyncError as exc:
        message = str(exc)
    if rank == 0:
        del syncer.transport.open  # back to the class's method
    report = syncer.sync()
    syncer.close()
    return message, report.num_tensors


# ------------------------------------------------------------------------------ references
def sglang_view(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors SGLang's Qwen3-MoE holds, fused by hand from HF-named tensors."""
    out = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"],
           "model.norm.weight": hf["model.norm.weight"], "lm_head.weight": hf["lm_head.weight"]}
    for layer in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        for same in ("self_attn.o_proj.weight", "self_attn.q_norm.weight",
                     "self_attn.k_norm.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight", "mlp.gate.weight"):
            out[p + same] = hf[p + same]
        experts = range(CFG["num_experts"])
        out[p + "mlp.experts.w13_weight"] = torch.stack([torch.cat(
            [hf[p + f"mlp.experts.{e}.gate_proj.weight"], hf[p + f"mlp.experts.{e}.up_proj.weight"]])
            for e in experts])
        out[p + "mlp.experts.w2_weight"] = torch.stack(
            [hf[p + f"mlp.experts.{e}.down_proj.weight"] for e in experts])
    return out


def checksums(hf, dtype, via=None):
    """SGLang's checksum (first 8 bytes of SHA-256 of the raw bytes) of each served tensor;
    ``via``: the dtype the tensors travelled in before the server cast them to ``dtype``."""
    out = {}
    for name, tensor in sglang_view(hf).items():
        if via is not None:
            tensor = tensor.to(via)
        data = tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = hashlib.sha256(memoryview(data)).digest()[:8].hex()
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Served weights A (the server starts with them) and trainer weights B (Megatron ckpt)."""
    from megatron_pr2.convert.pipeline import hf_to_megatron
    from megatron_pr2.convert.random_init import save_random_hf_checkpoint

    root = tmp_path_factory.mktemp("weight-sync")
    save_random_hf_checkpoint(CFG, str(root / "served"), seed=3, max_shard_size="10MB")
    save_random_hf_checkpoint(CFG, str(root / "trainer-hf"), seed=11, max_shard_size="10MB")
    hf_to_megatron(str(root / "trainer-hf"), str(root / "trainer"))
    return root


@pytest.fixture(scope="module")
def server(weights):
    srv = SGLangServer(str(weights / "served"), venv=VENV, startup_timeout=600,
                       max_lifetime=1200)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def single_process_reference(megatron_dir):
    """The single-process adapter output, plain and with predictive gates."""
    from megatron_pr2.convert.loading import (
        load_megatron_checkpoint,
        model_state_for_export,
    )
    from megatron_pr2.convert.registry import adapter_for
    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.routing.router import ReplayRouter

    _, _, model = build_model(CFG, options=ModelOptions(router_class=ReplayRouter))
    load_megatron_checkpoint(model, megatron_dir)
    adapter = adapter_for(CFG)
    plain = dict(adapter.to_hf(model_state_for_export(model).items()))
    set_predictors(model)
    predictive = dict(adapter.to_hf(model_state_for_export(model).items(), predictive_gate=True))
    return plain, predictive


def in_process_samples(hf):
    from megatron_pr2.rollout.inprocess import InProcessEngine

    engine = InProcessEngine(CFG)
    engine.update_weights(hf.items())
    return engine, engine.generate(PROMPTS, GREEDY)


def test_in_memory_sync_from_tp_ep_pp_equals_the_single_process_adapter(
        megatron_single_process, weights, server, tmp_path):
    plain, predictive = single_process_reference(str(weights / "trainer"))
    served_before = engine_checksums(type("E", (), {"addresses": [server.address]}))
    want = {"plain": checksums(plain, torch.float32),
            "predictive": checksums(predictive, torch.float32)}
    assert all(served_before[n] != want["plain"][n] for n in want["plain"]
               if "norm" not in n)  # the server starts with other weights
    gates = [f"model.layers.{layer}.mlp.gate.weight" for layer in range(CFG["num_hidden_layers"])]
    assert all(want["plain"][g] != want["predictive"][g] for g in gates)

    results = run_distributed(_sync_layouts, 2, server.address, str(weights / "trainer"),
                              str(tmp_path / "disk"), timeout=900)

    references = {"plain": in_process_samples(plain), "predictive": in_process_samples(predictive)}
    for layout in LAYOUTS:
        assert results[0][layout, "plain"][1] > 4  # several buckets
        for mode in ("plain", "predictive"):
            (served, samples), _ = results[0][layout, mode]
            where = f"{layout} {mode}"
            assert served == want[mode], where
            for (tokens, routes), expected in zip(samples, references[mode][1]):
                assert tokens.tolist() == expected.tokens.tolist(), where
                assert torch.equal(routes.long().sort(-1).values,
                                   expected.routed_experts.long().sort(-1).values), where

    for rank in range(2):
        message, tensors = results[rank]["ep2", "rejected"]
        assert message is not None and "begin_weight_update" in message, message
        assert tensors == len(plain)
    assert results[0]["pp2", "bf16-wire"][0] == checksums(plain, torch.float32, via=torch.bfloat16)
    assert results[0]["pp2", "disk"][0] == want["predictive"]
    engine_state = results[0]["pp2", "inprocess"][0]
    reference_state = references["predictive"][0].model.state_dict()
    assert engine_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert torch.equal(engine_state[name], tensor), name
