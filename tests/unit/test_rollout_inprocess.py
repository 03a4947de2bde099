"""In-process engine against a plain full forward of the same HF model, with routes computed by hand.

Reference for each generated sequence: one forward over all its tokens (no cache, no padding);
log-probs = log_softmax of those logits; routes = TopK(h W_r^T) from the gate inputs ``h``
recorded by the test's own hooks (not the gate's output).
"""

import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.hf_weights import WeightNameError
from megatron_pr2.rollout.inprocess import InProcessEngine, build_hf_model
from megatron_pr2.rollout.sample import SampleStatus, SamplingParams

PROMPTS = [[5, 7, 9, 11], [3, 4], [8, 9, 10, 11, 12, 13, 14]]


def make_engine(name="tiny-qwen3-moe", seed=0, **overrides):
    torch.manual_seed(seed)
    return InProcessEngine(preset(name, **overrides))


def full_forward_reference(model, tokens, moe_layers, top_k):
    """(log-probs [T, V], routes [T, L, K]) of one uncached forward, routes by hand."""
    inputs = {}
    handles = [model.model.layers[i].mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: inputs.__setitem__(i, (args[0], mod.weight)))
        for i in moe_layers]
    try:
        with torch.no_grad():
            logits = model(tokens[None]).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    routes = torch.stack([
        torch.topk(inputs[i][0].reshape(-1, inputs[i][1].shape[1]).float() @ inputs[i][1].float().T,
                   top_k, dim=-1).indices
        for i in moe_layers], dim=1)
    return torch.log_softmax(logits, dim=-1), routes


def check_against_reference(engine, samples, moe_layers, top_k, atol=1e-5):
    for sample in samples:
        log_probs, routes = full_forward_reference(engine.model, sample.tokens, moe_layers, top_k)
        p = sample.prompt_length
        expected = log_probs[p - 1:-1].gather(1, sample.tokens[p:, None])[:, 0]
        torch.testing.assert_close(sample.rollout_log_probs, expected, atol=atol, rtol=0)
        assert sample.routed_experts.shape == (sample.total_length - 1, len(moe_layers), top_k)
        # top-k sets per token (order within a top-k is not part of the contract)
        got = sample.routed_experts.long().sort(dim=-1).values
        assert torch.equal(got, routes[:-1].sort(dim=-1).values)


def test_greedy_batch_matches_uncached_forward():
    engine = make_engine()
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True))
    assert [s.prompt_length for s in samples] == [4, 2, 7]
    assert all(s.response_length == 6 and s.status is SampleStatus.TRUNCATED for s in samples)
    for sample in samples:
        log_probs, _ = full_forward_reference(engine.model, sample.tokens, [0], 2)
        p = sample.prompt_length
        assert torch.equal(log_probs[p - 1:-1].argmax(-1), sample.tokens[p:])  # greedy
    check_against_reference(engine, samples, [0, 1, 2, 3], 2)
    assert samples[0].routed_experts.dtype == torch.uint8


def test_routes_come_from_the_generation_forwards_only():
    engine = make_engine()
    calls = []
    handle = engine.model.model.register_forward_hook(lambda *a: calls.append(1))
    engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, greedy=True, ignore_eos=True))
    handle.remove()
    assert len(calls) == 5  # one prefill + four decode steps, no extra forward for routes


def test_dense_layers_have_no_route_entry():
    engine = make_engine(mlp_only_layers=[1])
    samples = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, greedy=True, ignore_eos=True))
    check_against_reference(engine, samples, [0, 2, 3], 2)


def test_qwen2_moe_with_shared_expert():
    engine = make_engine("tiny-qwen2-moe")
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, greedy=True, ignore_eos=True))
    check_against_reference(engine, samples, [0, 1, 2, 3], 2)


def test_stop_token_ends_a_sequence_and_is_kept():
    engine = make_engine()
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True))[0]
    stop = int(free.response_tokens[2])
    first = free.response_tokens.tolist().index(stop)
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, greedy=True,
                                                           stop_token_ids=(stop,)))[0]
    assert stopped.status is SampleStatus.COMPLETED
    assert stopped.tokens.tolist() == free.tokens[:4 + first + 1].tolist()
    assert stopped.routed_experts.shape[0] == stopped.total_length - 1
    check_against_reference(engine, [stopped], [0, 1, 2, 3], 2)


def test_sampled_log_probs_are_of_the_temperature_scaled_distribution():
    engine = make_engine()
    params = SamplingParams(max_new_tokens=5, temperature=0.7, seed=3, ignore_eos=True)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [s.tokens.tolist() for s in a] == [s.tokens.tolist() for s in b]
    for sample in a:
        with torch.no_grad():
            logits = engine.model(sample.tokens[None]).logits[0].float()
        p = sample.prompt_length
        expected = torch.log_softmax(logits[p - 1:-1] / 0.7, -1).gather(1, sample.tokens[p:, None])[:, 0]
        torch.testing.assert_close(sample.rollout_log_probs, expected, atol=1e-5, rtol=0)


def test_top_k_one_sampling_is_greedy():
    engine = make_engine()
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, greedy=True, ignore_eos=True))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, top_k=1, seed=0, ignore_eos=True))
    assert [s.tokens.tolist() for s in greedy] == [s.tokens.tolist() for s in top1]


def test_update_weights_from_checkpoint_names_matches_hf_loading(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    source = build_hf_model(preset("tiny-qwen3-moe"))
    source.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers' own loader
    engine = make_engine(seed=2)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in names  # per-expert checkpoint names
        engine.update_weights((n, f.get_tensor(n)) for n in names)
    ref_params = dict(reference.named_parameters())
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, ref_params[name]), name


def test_update_weights_rejects_unknown_names_and_shapes():
    engine = make_engine()
    with pytest.raises(WeightNameError, match="not a parameter"):
        engine.update_weights([("model.layers.0.mlp.router.weight", torch.zeros(8, 64))])
    with pytest.raises(ValueError, match=r"shape \(8, 32\) does not match"):
        engine.update_weights([("model.layers.0.mlp.gate.weight", torch.zeros(8, 32))])
    with pytest.raises(WeightNameError, match="expert 9 >= 8"):
        engine.update_weights([("model.layers.0.mlp.experts.9.gate_proj.weight", torch.zeros(32, 64))])


def test_gate_update_changes_routes_to_topk_of_new_gate():
    engine = make_engine()
    gate = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    engine.update_weights([("model.layers.2.mlp.gate.weight", gate)])
    samples = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4, greedy=True, ignore_eos=True))
    check_against_reference(engine, samples, [0, 1, 2, 3], 2)
    assert torch.equal(engine.model.model.layers[2].mlp.gate.weight, gate)


def test_bf16_engine_gives_a_real_mismatch():
    fp32 = make_engine()
    bf16 = InProcessEngine(fp32.hf_config, dtype=torch.bfloat16)
    bf16.update_weights(fp32.model.state_dict().items())
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    params = SamplingParams(max_new_tokens=4, greedy=True, ignore_eos=True)
    prompt = [PROMPTS[0]]
    lo = bf16.generate(prompt, params)[0]
    log_probs, _ = full_forward_reference(fp32.model, lo.tokens, [0], 2)
    p = lo.prompt_length
    fp32_lp = log_probs[p - 1:-1].gather(1, lo.tokens[p:, None])[:, 0]
    diff = (lo.rollout_log_probs - fp32_lp).abs()
    assert 0 < diff.max() < 0.2


def test_bad_prompts_are_rejected():
    engine = make_engine()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams(greedy=True))
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 64\)"):
        engine.generate([[64]], SamplingParams(greedy=True))
