"""PR2 predictor weights: round trip through Megatron checkpoints, and ``--predictive-gate``
output that makes an unmodified transformers router pick ``TopK(p + h W_p^T)``."""

import pytest
import torch
import transformers

from megatron_pr2.convert.loading import load_megatron_checkpoint
from megatron_pr2.convert.pipeline import hf_to_megatron, megatron_to_hf
from megatron_pr2.convert.random_init import save_random_hf_checkpoint
from megatron_pr2.models import ModelOptions, build_model
from megatron_pr2.models.presets import preset
from megatron_pr2.routing.router import ReplayRouter

CFG = preset("tiny-qwen3-moe", mlp_only_layers=[1])
MOE_LAYERS = [0, 2, 3]


def _pr2_model():
    _, _, model = build_model(CFG, options=ModelOptions(router_class=ReplayRouter))
    return model.eval()


def _gate_inputs_and_routes(hf_model, tokens):
    captured = {}
    handles = [hf_model.model.layers[i].mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, (args[0].detach(), out[2])))
        for i in MOE_LAYERS]
    with torch.no_grad():
        hf_model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return captured


@pytest.fixture(scope="module")
def trainer_checkpoint(megatron_single_process, tmp_path_factory):
    """An HF model, converted, loaded into a PR2 model, given predictor weights by hand and
    saved by Megatron's own ``dist_checkpointing.save`` (as the trainer does)."""
    from megatron.core import dist_checkpointing

    root = tmp_path_factory.mktemp("pr2")
    hf_model = save_random_hf_checkpoint(CFG, str(root / "hf"))
    hf_to_megatron(str(root / "hf"), str(root / "converted"))
    model = _pr2_model()
    load_megatron_checkpoint(model, str(root / "converted"))
    gen = torch.Generator().manual_seed(7)
    predictors = {}
    for layer in MOE_LAYERS:
        router = model.decoder.layers[layer].mlp.router
        assert torch.count_nonzero(router.predictor.weight) == 0   # zero init kept on load
        predictors[layer] = torch.randn(router.predictor.weight.shape, generator=gen)
        with torch.no_grad():
            router.predictor.weight.copy_(predictors[layer])
    (root / "trainer").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(root / "trainer"))
    return hf_model, predictors, root


def test_predictor_weights_round_trip_through_a_megatron_checkpoint(trainer_checkpoint):
    _, predictors, root = trainer_checkpoint
    model = _pr2_model()
    load_megatron_checkpoint(model, str(root / "trainer"))
    for layer, weight in predictors.items():
        assert torch.equal(model.decoder.layers[layer].mlp.router.predictor.weight, weight)


def test_predictive_gate_output_routes_with_router_plus_predictor(trainer_checkpoint):
    hf_model, predictors, root = trainer_checkpoint
    megatron_to_hf(str(root / "trainer"), str(root / "pg"), predictive_gate=True, hf_config=CFG)
    engine = transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "pg"), dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    captured = _gate_inputs_and_routes(engine, tokens)
    changed = 0
    for layer in MOE_LAYERS:
        hidden, routes = captured[layer]
        router_weight = hf_model.model.layers[layer].mlp.gate.weight.detach()
        p = hidden @ router_weight.T                         # the router's own logits
        predicted = p + hidden @ predictors[layer].T          # p + h W_p^T
        expected = predicted.topk(CFG["num_experts_per_tok"], dim=-1).indices.sort(-1).values
        assert torch.equal(routes.sort(-1).values, expected), f"layer {layer}"
        plain = p.topk(CFG["num_experts_per_tok"], dim=-1).indices.sort(-1).values
        changed += int((plain != expected).any(-1).sum())
    assert changed > 0, "the predictor never changed a route: the test would not see it ignored"


def test_without_the_flag_the_gate_is_the_router_weight(trainer_checkpoint):
    hf_model, _, root = trainer_checkpoint
    megatron_to_hf(str(root / "trainer"), str(root / "plain"), hf_config=CFG)
    engine = transformers.AutoModelForCausalLM.from_pretrained(str(root / "plain"), dtype=torch.float32)
    for layer in MOE_LAYERS:
        assert torch.equal(engine.model.layers[layer].mlp.gate.weight,
                           hf_model.model.layers[layer].mlp.gate.weight)


def test_predictive_gate_needs_predictor_weights(trainer_checkpoint):
    from megatron_pr2.convert.errors import ConversionError

    _, _, root = trainer_checkpoint
    with pytest.raises(ConversionError, match="predictor.weight.*--predictive-gate needs the PR2 "
                                              "predictor weights"):
        megatron_to_hf(str(root / "converted"), str(root / "nope"), predictive_gate=True)
