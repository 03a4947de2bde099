"""Inputs and outputs are checked before the model is built: `error:` lines, exit status 2."""

import os

from megatron_pr2.models.presets import PRESETS
from megatron_pr2.preflight.inputs import (
    data_problems,
    output_dir_problems,
    output_file_problems,
    tokenizer_problems,
)
from megatron_pr2.train import main


def test_data_file_problems(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"prompt": "1+1", "answer": "2"}\n')
    (tmp_path / "d.csv").write_text("x")
    assert data_problems(str(good)) == []
    assert data_problems(str(tmp_path / "none.jsonl")) == [
        f"--data-path {tmp_path}/none.jsonl: no such file"]
    assert data_problems(str(tmp_path)) == [f"--data-path {tmp_path}: not a file"]
    assert "unsupported format" in data_problems(str(tmp_path / "d.csv"))[0]


def test_tokenizer_paths_and_hub_ids(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    assert tokenizer_problems(str(tmp_path / "tok")) == []
    assert tokenizer_problems("Qwen/Qwen3-30B-A3B") == []  # a Hub id is left to transformers
    assert tokenizer_problems("/no/such/tokenizer") == [
        "--tokenizer /no/such/tokenizer: no such directory"]
    assert "holds none of tokenizer.json" in tokenizer_problems(str(tmp_path / "empty"))[0]
    assert "neither an existing directory nor a Hugging Face Hub id" in \
        tokenizer_problems("a/b/c")[0]


def test_output_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    assert output_dir_problems("--save", str(tmp_path / "new" / "deeper")) == []
    assert output_dir_problems("--save", str(tmp_path / "file")) == [
        f"--save {tmp_path}/file: exists and is not a directory"]
    assert "cannot be created" in output_dir_problems("--save", str(tmp_path / "file" / "x"))[0]
    assert output_file_problems("--log-jsonl", str(tmp_path)) == [
        f"--log-jsonl {tmp_path}: is a directory"]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        assert "is not writable" in output_dir_problems("--save", str(tmp_path / "ro" / "x"))[0]


def test_train_reports_every_problem_before_building_anything(tmp_path, capsys):
    code = main(["--task", "math", "--data-path", str(tmp_path / "x.jsonl"), "--tokenizer",
                 str(tmp_path / "tok"), "--hf-config", str(tmp_path / "config.json"),
                 "--log-jsonl", str(tmp_path)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    presets = ", ".join(sorted(PRESETS))
    assert lines == [
        (f"error: --hf-config {tmp_path}/config.json: neither an embedded preset ({presets}) "
         "nor an existing directory or file"),
        f"error: --data-path {tmp_path}/x.jsonl: no such file",
        f"error: --tokenizer {tmp_path}/tok: no such directory",
        f"error: --log-jsonl {tmp_path}: is a directory",
    ]
