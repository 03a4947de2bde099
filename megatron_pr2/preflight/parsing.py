"""Parse the trainer's flags, its config and the HF model config as the trainer does, with every
failure as a :class:`~megatron_pr2.preflight.problems.ValidationError`."""

from __future__ import annotations

import argparse
import difflib
import warnings
from collections.abc import Sequence

import yaml

from megatron_pr2.config import RunConfig, build_parser, known_flags, parse_config
from megatron_pr2.preflight.problems import ValidationError

_HELP = "see python -m megatron_pr2.train --help"


def check_flags(train_argv: Sequence[str]) -> None:
    """Parse the training flags alone; a bad flag or value raises one concise error.

    Raises:
        ValidationError: an unknown flag (with the closest known one) or a value of the wrong
            type, in argparse's words but without its usage text.
    """
    try:
        _, unknown = build_parser(exit_on_error=False).parse_known_args(list(train_argv))
    except argparse.ArgumentError as err:
        raise ValidationError([f"{err}; {_HELP}"]) from err
    if unknown:
        raise ValidationError([(f"unrecognized arguments: {' '.join(unknown)}"
                                f"{_closest_flags(unknown)}; {_HELP}")])


def _closest_flags(unknown: Sequence[str]) -> str:
    known = known_flags()
    flags = [arg.split("=")[0] for arg in unknown if arg.startswith("--")]
    hints = [match for flag in flags for match in difflib.get_close_matches(flag, known, n=1)]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


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


def load_model_sizes(hf_config: str):
    """Parse ``--hf-config`` (preset name, checkpoint dir or config.json) to a ``QwenMoeSizes``.

    Raises:
        ValidationError: the config is missing, malformed or unsupported.
    """
    import_models_quietly()
    from megatron_pr2.models.hf_config import parse_hf_config, resolve_hf_config

    try:
        return parse_hf_config(resolve_hf_config(hf_config))
    except KeyError as err:
        raise ValidationError([f"--hf-config {hf_config}: missing field {err}"]) from err
    except (OSError, ValueError) as err:  # UnsupportedConfigError and JSON errors are ValueErrors
        raise ValidationError([f"--hf-config {hf_config}: {err}"]) from err
