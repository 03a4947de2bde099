"""tools/convert.py: the three subcommands and its refusals."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_pr2.convert.random_init import save_random_hf_checkpoint
from megatron_pr2.models.presets import preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = preset("tiny-qwen3-moe", num_hidden_layers=2)


def _cli():
    spec = importlib.util.spec_from_file_location("convert_cli", os.path.join(ROOT, "tools", "convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_random_hf_checkpoint(CFG, str(root / "hf"), seed=2)
    save_random_hf_checkpoint(CFG, str(root / "other_hf"), seed=3)
    main = _cli()
    assert main(["--quiet", "hf-to-megatron", "--hf-dir", str(root / "hf"),
                 "--out", str(root / "mg"), "--tp", "2", "--ep", "2"]) == 0
    assert main(["--quiet", "hf-to-megatron", "--hf-dir", str(root / "other_hf"),
                 "--out", str(root / "other_mg")]) == 0
    return root


def test_megatron_to_hf_in_a_fresh_process_restores_the_weights(converted):
    out = converted / "back"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert.py"), "megatron-to-hf",
         "--megatron-dir", str(converted / "mg"), "--out", str(out), "--max-shard-size", "200KB"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "GB/s" in result.stdout
    with open(out / "model.safetensors.index.json") as handle:
        weight_map = json.load(handle)["weight_map"]
    source = {}
    for shard in sorted(p for p in os.listdir(converted / "hf") if p.endswith(".safetensors")):
        source.update(load_file(str(converted / "hf" / shard)))
    back = {}
    for shard in sorted(set(weight_map.values())):
        back.update(load_file(str(out / shard)))
    assert back.keys() == source.keys()
    assert all(torch.equal(back[k], source[k]) for k in source)


def test_verify_passes_on_the_matching_pair_and_fails_on_another_model(converted, capsys):
    main = _cli()
    assert main(["--quiet", "verify", "--hf-dir", str(converted / "hf"),
                 "--megatron-dir", str(converted / "mg"), "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "top-k route agreement: min 1.0000" in out and "OK" in out
    assert main(["--quiet", "verify", "--hf-dir", str(converted / "hf"),
                 "--megatron-dir", str(converted / "other_mg"), "--seq-len", "8"]) == 1
    assert "FAILED" in capsys.readouterr().out


def _copy_hf(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as fin, open(os.path.join(dst, name), "wb") as fout:
            fout.write(fin.read())


def _break_architecture(hf_dir):
    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    config["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(hf_dir, "config.json"), "w") as handle:
        json.dump(config, handle)


def _delete_a_shard(hf_dir):
    shards = sorted(p for p in os.listdir(hf_dir) if p.startswith("model-"))
    os.remove(os.path.join(hf_dir, shards[1]))


def _misshape_norm(hf_dir):
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as handle:
        shard = json.load(handle)["weight_map"]["model.norm.weight"]
    tensors = load_file(os.path.join(hf_dir, shard))
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, os.path.join(hf_dir, shard))


@pytest.mark.parametrize("breakage,extra,message", [
    (_break_architecture, [], "unsupported architecture 'LlamaForCausalLM'"),
    (_delete_a_shard, [], "missing shard files in"),
    (_misshape_norm, [], r"shape mismatch for model.norm.weight: checkpoint has \(63,\)"),
    (None, ["--tp", "3"], "num_attention_heads=4 is not divisible by --tp=3"),
    (None, ["--ep", "16"], "num_experts=8 is not divisible by --ep=16"),
])
def test_hf_to_megatron_refusals_name_the_problem(converted, tmp_path, capsys, breakage, extra,
                                                  message):
    import re

    hf_dir = str(tmp_path / "hf")
    _copy_hf(str(converted / "hf"), hf_dir)
    if breakage:
        breakage(hf_dir)
    code = _cli()(["--quiet", "hf-to-megatron", "--hf-dir", hf_dir,
                   "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "out" / "metadata.json")


def test_megatron_to_hf_refusals_name_the_problem(converted, tmp_path, capsys):
    main = _cli()
    assert main(["--quiet", "hf-to-megatron", "--hf-dir", str(converted / "hf"),
                 "--out", str(converted / "mg")]) == 2
    assert "output directory" in capsys.readouterr().err
    assert main(["--quiet", "megatron-to-hf", "--megatron-dir", str(converted / "hf"),
                 "--out", str(tmp_path / "a"), "--hf-config", str(converted / "hf")]) == 2
    assert "is a Hugging Face checkpoint, not a Megatron one" in capsys.readouterr().err
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(converted / "mg"):
        if name != "hf_config.json" and not os.path.isdir(converted / "mg" / name):
            with open(converted / "mg" / name, "rb") as fin, open(bare / name, "wb") as fout:
                fout.write(fin.read())
    assert main(["--quiet", "megatron-to-hf", "--megatron-dir", str(bare),
                 "--out", str(tmp_path / "b")]) == 2
    assert "pass the model's HF config (--hf-config)" in capsys.readouterr().err
    mismatched = preset("tiny-qwen3-moe", num_hidden_layers=2, moe_intermediate_size=16)
    with open(tmp_path / "config.json", "w") as handle:
        json.dump(mismatched, handle)
    assert main(["--quiet", "megatron-to-hf", "--megatron-dir", str(bare), "--out",
                 str(tmp_path / "c"), "--hf-config", str(tmp_path / "config.json")]) == 2
    assert "shape mismatch for decoder.layers.0.mlp.experts.experts.linear_fc1.weight" in \
        capsys.readouterr().err
