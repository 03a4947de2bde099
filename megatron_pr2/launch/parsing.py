"""Parse the trainer's flags, its config and the HF model config as the trainer does, with every
failure as a :class:`~megatron_pr2.launch.problems.ValidationError`."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

import yaml

from megatron_pr2.config import RunConfig, build_parser, parse_config
from megatron_pr2.launch.problems import ValidationError


def check_flags(train_argv: Sequence[str]) -> None:
    """Parse the training flags alone; a bad flag or value raises one concise error.

    Raises:
        ValidationError: an unknown flag (with the closest known one) or a value of the wrong
            type, in argparse's words but without its usage text.
    """
    parser = build_parser()
    # argparse has no public list of its option strings
    known = [opt for action in parser._actions for opt in action.option_strings]

    def fail(message: str):
        flags = [arg.split("=")[0] for arg in train_argv if arg.startswith("--")]
        hints = [match for flag in flags if flag not in known
                 for match in difflib.get_close_matches(flag, known, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValidationError([f"{message}{hint}; see python -m megatron_pr2.train --help"])

    parser.error = fail
    parser.parse_args(list(train_argv))


def load_config(train_argv: Sequence[str]) -> RunConfig:
    """The trainer's own config parsing, with every failure as a :class:`ValidationError`."""
    check_flags(train_argv)
    try:
        return parse_config(list(train_argv))
    except yaml.YAMLError as err:
        raise ValidationError([f"--config is not valid YAML: {err}"]) from err
    except (ValueError, OSError) as err:
        raise ValidationError([str(err)]) from err


# ----------------------------------------------------------------------------------- model
def import_models_quietly() -> None:
    """Import megatron_pr2.models/.platform, hiding Megatron-Core's warnings about absent TE."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron_pr2.models  # noqa: F401


def load_model_spec(hf_config: str):
    """Parse ``--hf-config`` (preset name, checkpoint dir or config.json) to a ``QwenMoeSpec``.

    Raises:
        ValidationError: the config is missing, malformed or unsupported.
    """
    import_models_quietly()
    from megatron_pr2.models.hf_config import load_hf_config, parse_hf_config
    from megatron_pr2.models.presets import PRESETS

    try:
        raw = dict(PRESETS[hf_config]) if hf_config in PRESETS else load_hf_config(hf_config)
        return parse_hf_config(raw)
    except KeyError as err:
        raise ValidationError([f"--hf-config {hf_config}: missing field {err}"]) from err
    except (OSError, ValueError) as err:  # UnsupportedConfigError and JSON errors are ValueErrors
        raise ValidationError([f"--hf-config {hf_config}: {err}"]) from err
