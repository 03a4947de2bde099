"""Input and output paths of a training run, checked before any process group or model exists.

``python -m megatron_pr2.train`` calls :func:`check_inputs` right after parsing its flags, so a
missing data file, tokenizer or model config, or an output directory that cannot be written,
is reported as ``error: ...`` lines (exit 2) instead of a traceback after the model is built.
``python -m megatron_pr2.preflight.validate`` applies the same :func:`input_problems`: as errors
with ``--check-runtime`` (on the launch machine), as notes in a dry run.
"""

from __future__ import annotations

import os
import re

from megatron_pr2.models.presets import PRESETS

DATA_SUFFIXES = (".jsonl", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# "name" or "namespace/name" as the Hugging Face Hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class InputError(ValueError):
    """Some inputs or outputs of the run are unusable; ``problems`` names each one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def data_problems(data_path: str | None, flag: str = "--data-path") -> list[str]:
    if not data_path:
        return []
    if not os.path.exists(data_path):
        return [f"{flag} {data_path}: no such file"]
    if not os.path.isfile(data_path):
        return [f"{flag} {data_path}: not a file"]
    if not data_path.endswith(DATA_SUFFIXES):
        return [(f"{flag} {data_path}: unsupported format; use one of "
                 f"{', '.join(DATA_SUFFIXES)}")]
    if not os.access(data_path, os.R_OK):
        return [f"{flag} {data_path}: not readable"]
    return []


def tokenizer_problems(tokenizer: str | None) -> list[str]:
    """A local tokenizer must be a directory with tokenizer files; else a Hub id is expected."""
    if not tokenizer:
        return []
    path = os.path.expanduser(tokenizer)
    if _looks_local(tokenizer):
        if not os.path.exists(path):
            return [f"--tokenizer {tokenizer}: no such directory"]
        if not os.path.isdir(path):
            return [f"--tokenizer {tokenizer}: not a directory (give the tokenizer's folder)"]
        if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
            return [(f"--tokenizer {tokenizer}: the directory holds none of "
                     f"{', '.join(TOKENIZER_FILES)}")]
        return []
    if not HUB_ID.match(tokenizer):
        return [(f"--tokenizer {tokenizer}: neither an existing directory nor a Hugging Face "
                 "Hub id (namespace/name)")]
    return []


def model_problems(hf_config: str, load: str | None) -> list[str]:
    problems = []
    if hf_config not in PRESETS and not os.path.exists(hf_config):
        problems.append(f"--hf-config {hf_config}: neither an embedded preset "
                        f"({', '.join(sorted(PRESETS))}) nor an existing directory or file")
    if load and not os.path.isdir(load):
        problems.append(f"--load {load}: no such checkpoint directory")
    elif load:
        problems += load_target_problems(load)
    return problems


def load_target_problems(load: str) -> list[str]:
    """``--load`` must be a Megatron distributed checkpoint (``tools/convert.py`` output or one
    ``iter_N`` folder of a trainer's ``--save``)."""
    from megatron_pr2.convert.dist_checkpoint import not_a_checkpoint_reason

    reason = not_a_checkpoint_reason(load)
    return [f"--load {load} {reason}"] if reason else []


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def output_dir_problems(flag: str, directory: str | None) -> list[str]:
    """``directory`` exists as a writable folder or can be created."""
    if not directory:
        return []
    if os.path.exists(directory) and not os.path.isdir(directory):
        return [f"{flag} {directory}: exists and is not a directory"]
    base = _nearest_existing(directory)
    if not os.path.isdir(base):
        return [f"{flag} {directory}: cannot be created ({base} is not a directory)"]
    if not os.access(base, os.W_OK | os.X_OK):
        return [f"{flag} {directory}: {base} is not writable"]
    return []


def output_file_problems(flag: str, path: str | None) -> list[str]:
    if not path:
        return []
    if os.path.isdir(path):
        return [f"{flag} {path}: is a directory"]
    if os.path.exists(path):
        return [] if os.access(path, os.W_OK) else [f"{flag} {path}: not writable"]
    return output_dir_problems(flag, os.path.dirname(os.path.abspath(path)))


def input_problems(cfg) -> list[str]:
    """Every unusable input or output of ``cfg`` (a ``RunConfig``), one message each."""
    return [
        *model_problems(cfg.model.hf_config, cfg.model.load),
        *data_problems(cfg.task.data_path),
        *data_problems(cfg.task.eval_data_path, "--eval-data-path"),
        *tokenizer_problems(cfg.task.tokenizer),
        *output_dir_problems("--save", cfg.train.save),
        *output_dir_problems("--tensorboard-dir", cfg.train.tensorboard_dir),
        *output_file_problems("--log-jsonl", cfg.train.log_jsonl),
    ]


def check_inputs(cfg) -> None:
    """Raise :class:`InputError` listing every unusable input or output of ``cfg``."""
    problems = input_problems(cfg)
    if problems:
        raise InputError(problems)
