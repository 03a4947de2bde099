"""A real SGLang server on CPU (its own venv, 127.0.0.1) answers the adapter like the in-process engine.

Skipped when SGLang's venv (``tools/sglang_env.sh``) is absent. The server serves a tiny random
Qwen3-MoE written with ``save_pretrained`` (fp32), is bounded in time, and is always stopped.
References: the in-process ``transformers`` engine on the same checkpoint (tokens, routes,
log-probs), and routes ``TopK(p + h W_p)`` computed by hand from gate inputs ``h``.
"""

import os
import shutil

import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.engine import PartialRolloutError
from megatron_pr2.rollout.inprocess import InProcessEngine, build_hf_model
from megatron_pr2.rollout.route_codec import RouteShape
from megatron_pr2.rollout.sample import SamplingParams
from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
from megatron_pr2.rollout.sglang_server import SGLangServer
from tests.integration.sglang_venv import VENV, requires_sglang_venv

pytestmark = requires_sglang_venv

CFG = preset("tiny-qwen3-moe")
MOE_LAYERS = range(CFG["num_hidden_layers"])
PROMPTS = [[5, 7, 9, 11], [3, 4], [8, 9, 10, 11, 12, 13, 14], [30, 31, 32], [17]]
GREEDY = SamplingParams(max_new_tokens=8, greedy=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    torch.manual_seed(0)
    build_hf_model(CFG).save_pretrained(path)  # fp32 safetensors + config.json
    return str(path)


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = SGLangServer(checkpoint, venv=VENV, startup_timeout=300, max_lifetime=1200)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return SGLangClient.for_hf_config([server.address], CFG,
                                      config=SGLangClientConfig(request_timeout=120, max_concurrency=2))


def sorted_routes(routes):
    return routes.long().sort(dim=-1).values


def test_greedy_tokens_routes_and_logprobs_equal_the_in_process_engine(client, checkpoint):
    assert client.health(deep=True).ok
    remote = client.generate(PROMPTS, GREEDY)
    local = InProcessEngine.from_pretrained(checkpoint).generate(PROMPTS, GREEDY)
    for r, l in zip(remote, local):
        assert r.tokens.tolist() == l.tokens.tolist()
        assert r.status == l.status
        assert torch.equal(sorted_routes(r.routed_experts), sorted_routes(l.routed_experts))
        torch.testing.assert_close(r.rollout_log_probs, l.rollout_log_probs, atol=1e-5, rtol=0)


def test_routed_experts_start_len_returns_the_tail(client):
    full = client.generate(PROMPTS[:1], GREEDY)[0]
    from megatron_pr2.rollout.sglang_client import (
        build_generate_payload,
        parse_generate_response,
    )

    payload = build_generate_payload(PROMPTS[0], GREEDY, return_logprobs=True,
                                     return_routed_experts=True, routed_experts_start_len=3)
    body, _ = client._request("POST", "/generate", payload)
    tail = parse_generate_response(body, PROMPTS[0], client.route_shape, vocab_size=64, return_logprobs=True,
                                   return_routed_experts=True, routed_experts_start_len=3)
    assert torch.equal(tail.metadata["routed_experts_tail"], full.routed_experts[3:])


def test_answer_that_breaks_the_layout_is_a_clear_error(server):
    wrong = SGLangClient([server.address], RouteShape(4, (0, 1, 2, 3), top_k=3, num_experts=8),
                         vocab_size=64)
    message = r"routed_experts has \d+ int32 entries \(\d+ bytes\), expected \d+ = \d+ rows x 4 layers"
    with pytest.raises(PartialRolloutError, match=message + " x top-3") as info:
        wrong.generate(PROMPTS[:2], GREEDY)
    assert info.value.failed_indices == [0, 1]


@pytest.mark.sglang
@pytest.mark.slow
def test_the_samples_of_one_prompt_differ_and_the_server_takes_every_seed(client):
    """The samples of a batch (one prompt, per-request seeds) each get an answer and differ.

    SGLang samples from ``sampling_seed`` only under ``--enable-deterministic-inference``, which
    it refuses on CPU (attention backend ``intel_amx``); here the server validates every seed the
    client sends (an int in range) and samples freely. The seeds themselves are checked on the
    wire in tests/unit/test_rollout_sglang_client.py.
    """
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    samples = client.generate([PROMPTS[0]] * 4, sampled, return_routed_experts=False)
    responses = {tuple(s.tokens.tolist()[len(PROMPTS[0]):]) for s in samples}
    assert len(responses) > 1, f"all 4 samples of the prompt are identical: {responses}"


def gate_inputs(model, tokens):
    """Router inputs ``h`` [T, H] of every MoE layer in one uncached forward."""
    captured = {}
    handles = [model.model.layers[i].mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])))
        for i in MOE_LAYERS]
    try:
        with torch.no_grad():
            model(tokens[None])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def write_predictive_checkpoint(source, target, predictors):
    """Copy ``source`` with each MoE gate replaced by ``W_r + W_p`` (the predictive gate)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(target, exist_ok=True)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    for layer, w_p in predictors.items():
        name = f"model.layers.{layer}.mlp.gate.weight"
        tensors[name] = tensors[name] + w_p
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(source, "config.json"), os.path.join(target, "config.json"))
    return tensors


def test_predictive_gate_routes_are_topk_of_p_plus_h_wp(client, checkpoint, tmp_path):
    from safetensors.torch import load_file

    original = load_file(os.path.join(checkpoint, "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    predictors = {l: 0.05 * torch.randn(8, 64, generator=gen) for l in MOE_LAYERS}
    predictive_dir = str(tmp_path / "predictive")
    write_predictive_checkpoint(checkpoint, predictive_dir, predictors)
    try:
        client.update_weights_from_disk(predictive_dir)
        samples = client.generate(PROMPTS, GREEDY)
        reference = InProcessEngine.from_pretrained(predictive_dir).model
        changed = total = 0
        for sample in samples:
            h = gate_inputs(reference, sample.tokens)
            for slot, layer in enumerate(MOE_LAYERS):
                w_r = original[f"model.layers.{layer}.mlp.gate.weight"]
                p = h[layer] @ w_r.T
                expected = torch.topk(p + h[layer] @ predictors[layer].T, 2, dim=-1).indices[:-1]
                assert torch.equal(sorted_routes(sample.routed_experts[:, slot]), expected.sort(-1).values)
                live = torch.topk(p, 2, dim=-1).indices[:-1].sort(-1).values
                changed += int((live != expected.sort(-1).values).any(-1).sum())
                total += live.shape[0]
        assert changed > 0.1 * total  # the predictor really moved routes

        # the same predictive gates pushed as tensors give the same routes
        client.update_weights_from_disk(checkpoint)
        client.update_weights([(f"model.layers.{l}.mlp.gate.weight",
                                original[f"model.layers.{l}.mlp.gate.weight"] + predictors[l])
                               for l in MOE_LAYERS])
        again = client.generate(PROMPTS, GREEDY)
        for a, b in zip(again, samples):
            assert a.tokens.tolist() == b.tokens.tolist()
            assert torch.equal(sorted_routes(a.routed_experts), sorted_routes(b.routed_experts))
    finally:
        client.update_weights_from_disk(checkpoint)
    restored = client.generate(PROMPTS[:1], GREEDY)[0]
    local = InProcessEngine.from_pretrained(checkpoint).generate(PROMPTS[:1], GREEDY)[0]
    assert restored.tokens.tolist() == local.tokens.tolist()
