"""Weight sync into the in-process engine: in memory and through an HF checkpoint directory."""

import json

import pytest
import torch

from megatron_pr2.models.presets import preset
from megatron_pr2.rollout.inprocess import InProcessEngine, build_hf_model
from megatron_pr2.rollout.weight_sync import DiskWeightSync, TensorWeightSync

CFG = preset("tiny-qwen3-moe")


def source_tensors(seed=3):
    torch.manual_seed(seed)
    return dict(build_hf_model(CFG).state_dict())


def test_tensor_sync_loads_every_weight_and_reports_what_it_moved():
    tensors = source_tensors()
    engine = InProcessEngine(CFG)
    sync = TensorWeightSync(engine)
    report = sync.push(tensors.items())
    assert report.version == 1 and report.num_tensors == len(tensors)
    assert report.num_bytes == sum(t.numel() * 4 for t in tensors.values())
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, tensors[name]), name
    assert sync.push([]).version == 2


def test_tensor_sync_casts_for_a_low_precision_engine():
    tensors = source_tensors()
    engine = InProcessEngine(CFG, dtype=torch.bfloat16)
    report = TensorWeightSync(engine, dtype=torch.bfloat16).push(tensors.items())
    assert report.num_bytes == sum(t.numel() * 2 for t in tensors.values())
    gate = engine.model.model.layers[1].mlp.gate.weight
    assert gate.dtype == torch.bfloat16
    assert torch.equal(gate, tensors["model.layers.1.mlp.gate.weight"].to(torch.bfloat16))


def test_duplicate_names_are_rejected():
    engine = InProcessEngine(CFG)
    gate = torch.zeros(8, 64)
    with pytest.raises(ValueError, match="got tensor 'model.layers.0.mlp.gate.weight' twice"):
        TensorWeightSync(engine).push([("model.layers.0.mlp.gate.weight", gate)] * 2)


def test_disk_sync_writes_a_checkpoint_the_engine_reloads(tmp_path):
    tensors = source_tensors(seed=5)
    engine = InProcessEngine(CFG)
    report = DiskWeightSync(engine, str(tmp_path / "sync"), CFG).push(tensors.items())
    assert report.num_tensors == len(tensors)
    assert json.loads((tmp_path / "sync" / "config.json").read_text())["num_experts"] == 8
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, tensors[name]), name
    reloaded = InProcessEngine.from_pretrained(str(tmp_path / "sync"))  # a valid HF checkpoint
    for name, value in reloaded.model.state_dict().items():
        assert torch.equal(value, tensors[name]), name
