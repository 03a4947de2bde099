"""Every bad input ends the trainer and tools/convert.py with one `error:` line, no traceback and
the documented exit status (2: bad input); convert leaves its output path as it was.

The trainer cases fail in the checks before any process group or model exists, so they run
in-process through ``main(argv)``; one case runs ``python -m megatron_pr2.train`` to check the
process-level behaviour (exit status and stderr of a real launch).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from megatron_pr2.cli_errors import DEBUG_ENV, EXIT_BAD_INPUT, run_reporting
from megatron_pr2.convert.random_init import write_random_hf_checkpoint
from megatron_pr2.models.hf_config import resolve_hf_config
from megatron_pr2.train import main as train_main
from tests.unit.test_rollout_source import write_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _math_flags(tmp_path, lines: list[str]) -> list[str]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    write_tokenizer(tmp_path / "tok")
    return ["--task", "math", "--data-path", str(data), "--tokenizer", str(tmp_path / "tok")]


def _yaml(tmp_path, text: str) -> list[str]:
    (tmp_path / "run.yaml").write_text(text)
    return ["--config", str(tmp_path / "run.yaml")]


def _save_dir_flags(tmp_path) -> list[str]:
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    return ["--load", str(tmp_path)]


# (case id, argv builder, text the single error line must hold)
TRAIN_CASES = [
    ("yaml-syntax", lambda t: _yaml(t, "lr: [1\n"), "run.yaml:2: not valid YAML"),
    ("yaml-type", lambda t: _yaml(t, "lr: fast\n"), "run.yaml: lr must be float, got 'fast'"),
    ("yaml-unknown", lambda t: _yaml(t, "parallel:\n  tp: 2\n"), "unknown setting 'tp'"),
    ("tp-3", lambda t: ["--tensor-model-parallel-size", "3", "--sequence-parallel"],
     "world size 1 is not divisible by TP*PP*CP = 3*1*1 = 3"),
    ("ep-3", lambda t: ["--expert-model-parallel-size", "3"],
     "world size 1 is not divisible by ETP*EP*PP = 3"),
    ("temperature-0", lambda t: ["--temperature", "0"], "--temperature must be a finite number > 0"),
    ("temperature-neg", lambda t: ["--temperature", "-1"], "got -1.0"),
    ("lr-inf", lambda t: ["--lr", "inf"], "--lr must be a finite number in (0, 1], got inf"),
    ("lr-huge", lambda t: ["--lr", "1e38"], "--lr must be a finite number in (0, 1], got 1e+38"),
    ("lr-nan", lambda t: ["--lr", "nan"], "--lr must be a finite number in (0, 1], got nan"),
    ("warmup-lr-inf", lambda t: ["--warmup-sft-lr", "inf"], "--warmup-sft-lr must be"),
    ("unknown-flag", lambda t: ["--lr-bogus", "1"], "unrecognized arguments: --lr-bogus 1"),
    ("math-bad-json", lambda t: _math_flags(t, ['{"prompt": "what is 1 ?", "answer": "1"}',
                                                '{"prompt": oops']),
     "data.jsonl:2: invalid JSON"),
    ("math-missing-field", lambda t: _math_flags(t, ['{"prompt": "what is 1 ?"}']),
     "data.jsonl:1: missing field 'answer'"),
    ("math-vocab", lambda t: _math_flags(t, ['{"prompt": "what is 1 ?", "answer": "1"}']),
     "has 109 tokens, more than the vocabulary (64)"),
    ("math-warmup", lambda t: [*_math_flags(t, ['{"prompt": "what is 1 ?", "answer": "1"}']),
                               "--warmup-sft-steps", "2"],
     "--warmup-sft-steps is for the embedded digit task"),
    ("load-empty-dir", lambda t: ["--load", str(t)], "is not a Megatron distributed checkpoint"),
    ("load-save-dir", lambda t: _save_dir_flags(t),
     "is a trainer's --save directory, not one checkpoint"),
    ("sglang-unreachable", lambda t: ["--rollout-engine", "sglang", "--sglang-urls",
                                      f"http://127.0.0.1:{_free_port()}"],
     "no answer on /health"),
]


def _single_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_trainer_refuses_bad_input_with_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    _, argv, expected = case
    code = train_main(argv(tmp_path))
    line = _single_error(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert line.startswith("error: ") and expected in line, line


def test_trainer_process_exit_status_and_stderr(tmp_path):
    """A real launch: exit status 2, stderr is the one error line and nothing else."""
    (tmp_path / "run.yaml").write_text("lr: fast\n")
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore"}
    env.pop(DEBUG_ENV, None)
    done = subprocess.run([sys.executable, "-m", "megatron_pr2.train", "--config",
                           str(tmp_path / "run.yaml")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=REPO, check=False)
    assert done.returncode == EXIT_BAD_INPUT
    assert _single_error(done.stderr) == f"error: --config {tmp_path}/run.yaml: lr must be " \
        "float, got 'fast'"


def test_run_reporting_codes_and_debug(capsys):
    def interrupted():
        raise KeyboardInterrupt

    def bug():
        raise ZeroDivisionError("division by zero")

    assert run_reporting(interrupted) == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"
    assert run_reporting(bug, bad_input=(ValueError,)) == 1
    assert capsys.readouterr().err == (
        f"error: unexpected ZeroDivisionError: division by zero; rerun with --debug or "
        f"{DEBUG_ENV}=1 for the traceback\n")
    assert run_reporting(bug, faults=(ArithmeticError,), debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: division by zero\n")
    assert run_reporting(lambda: None) == 0
    assert run_reporting(lambda: 3) == 3

    def long_story():
        raise OSError("disk failed\nTraceback (most recent call last):\n  File x")

    assert run_reporting(long_story, faults=(OSError,)) == 1
    assert capsys.readouterr().err == ("error: disk failed (and 2 more lines: rerun with "
                                       "--debug)\n")


# ------------------------------------------------------------------------- tools/convert.py
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    write_random_hf_checkpoint(resolve_hf_config("tiny-qwen3-moe"), str(path), 1 << 20,
                               dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def megatron_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    assert convert.main(["--quiet", "hf-to-megatron", "--hf-dir", str(hf_dir), "--out",
                         str(out)]) == 0
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate_last(directory, suffix, keep):
    path = directory / max(p for p in os.listdir(directory) if p.endswith(suffix))
    os.truncate(path, keep(os.path.getsize(path)))


def _truncated_hf(t, hf, mg):
    _truncate_last(_copy(hf, t / "in"), ".safetensors", lambda size: size - 100)
    return ["hf-to-megatron", "--hf-dir", str(t / "in")]


def _truncated_distcp(t, hf, mg):
    _truncate_last(_copy(mg, t / "in"), ".distcp", lambda size: size // 2)
    return ["megatron-to-hf", "--megatron-dir", str(t / "in")]


def _edited_config(t, hf, edit):
    _copy(hf, t / "in")
    edit(t / "in" / "config.json")
    return ["hf-to-megatron", "--hf-dir", str(t / "in")]


def _llama(path):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "model_type": "llama"}))


def _megatron_dir_case(make):
    return lambda t, hf, mg: ["megatron-to-hf", "--megatron-dir", str(make(t, hf))]


CONVERT_CASES = [
    ("truncated-safetensors", _truncated_hf, "model.safetensors is truncated"),
    ("truncated-distcp", _truncated_distcp, "the checkpoint is truncated or incomplete"),
    ("malformed-config", lambda t, hf, mg: _edited_config(t, hf, lambda p: p.write_text("{bad")),
     "config.json:1: not valid JSON"),
    ("llama-model-type", lambda t, hf, mg: _edited_config(t, hf, _llama),
     "model_type 'llama' contradicts architectures"),
    ("megatron-dir-file", _megatron_dir_case(lambda t, hf: hf / "config.json"),
     "is a file, not a checkpoint directory"),
    ("megatron-dir-empty", _megatron_dir_case(lambda t, hf: (t / "e").mkdir() or t / "e"),
     "is not a Megatron distributed checkpoint"),
    ("megatron-dir-hf", _megatron_dir_case(lambda t, hf: hf), "is a Hugging Face checkpoint"),
]


@pytest.mark.parametrize("existing_out", [False, True], ids=["new-out", "empty-out"])
@pytest.mark.parametrize("case", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_refuses_bad_input_and_leaves_out_as_it_was(case, existing_out, hf_dir,
                                                             megatron_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    _, make_argv, expected = case
    out = tmp_path / "out"
    if existing_out:
        out.mkdir()
    argv = make_argv(tmp_path, hf_dir, megatron_dir)
    before = sorted(os.listdir(tmp_path))
    code = convert.main(["--quiet", *argv, "--out", str(out)])
    line = _single_error(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT
    assert expected in line, line
    after = sorted(os.listdir(tmp_path))
    assert [n for n in after if n not in before] == []  # no output, no staging folder
    assert os.listdir(out) == [] if existing_out else not out.exists()


# ----------------------------------------------------------------------------- compare
COMPARE_CASES = [
    ("lr-inf", ["--lr", "inf"], "--lr must be a finite number in (0, 1], got inf"),
    ("unknown-method", ["--methods", "r3,bogus"], "--routing-method must be one of"),
    ("missing-model", ["--model", "/no/such/config.json"], "--hf-config /no/such/config.json"),
]


@pytest.mark.parametrize("case", COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_compare_refuses_bad_input_before_any_run(case, tmp_path, capsys, monkeypatch):
    from megatron_pr2.compare import main as compare_main

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    _, argv, expected = case
    code = compare_main([*argv, "--out", str(tmp_path / "out")])
    line = _single_error(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT and expected in line, line
    assert not (tmp_path / "out").exists()


def test_convert_failing_mid_write_leaves_nothing_behind(hf_dir, tmp_path, capsys, monkeypatch):
    """A source that breaks after some tensors were written (inside torch's checkpoint writer,
    which wraps the error): one line naming the file, and neither output nor staging left."""
    from megatron_pr2.convert.errors import ConversionError
    from megatron_pr2.convert.safetensors_io import SafetensorsReader

    read, calls = SafetensorsReader.read, []

    def breaks_later(self, name):
        calls.append(name)
        if len(calls) > 20:
            raise ConversionError(f"{self.path} is truncated (reading {name})")
        return read(self, name)

    monkeypatch.setattr(SafetensorsReader, "read", breaks_later)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    code = convert.main(["--quiet", "hf-to-megatron", "--hf-dir", str(hf_dir), "--out",
                         str(tmp_path / "out")])
    line = _single_error(capsys.readouterr().err)
    assert code == EXIT_BAD_INPUT and len(calls) == 21
    assert line == f"error: {hf_dir}/model.safetensors is truncated (reading {calls[-1]})"
    assert os.listdir(tmp_path) == []
