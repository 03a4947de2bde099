"""``--help`` of every entry point describes every flag; choice lists match what is accepted."""

import argparse
import dataclasses
import importlib.util
import os
import re
import typing

import pytest

from megatron_pr2.cli_help import TRAIN_CHOICES, TRAIN_HELP
from megatron_pr2.config import RunConfig, build_parser
from megatron_pr2.routing.methods import ROUTING_METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(ROOT, "tools",
                                                                            f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(parser):
    """``(parser, action)`` for every argument of ``parser`` and of its sub-commands."""
    for action in parser._actions:  # argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser, action


def _undescribed(parser):
    return [f"{p.prog}: {a.option_strings or a.dest}" for p, a in _options(parser)
            if not a.help or a.help.startswith("default:")]


def _parsers():
    from megatron_pr2.compare import parse_args
    from megatron_pr2.preflight.validate import _parser as validate_parser

    compare_parsers, original_parse = [], argparse.ArgumentParser.parse_args

    def capture(parser, *args, **kwargs):  # compare builds its parser inside parse_args
        compare_parsers.append(parser)
        return original_parse(parser, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        parse_args([])
    return {"train": build_parser(), "compare": compare_parsers[0],
            "preflight.validate": validate_parser(), "convert": _tool("convert")._parser(),
            "launch_sglang": _tool("launch_sglang").build_parser()}


@pytest.mark.parametrize("name", ["train", "compare", "preflight.validate", "convert",
                                  "launch_sglang"])
def test_every_flag_has_a_description(name):
    assert _undescribed(_parsers()[name]) == []


def test_help_texts_name_only_config_fields():
    fields = {f.name for s in dataclasses.fields(RunConfig)
              for f in dataclasses.fields(s.default_factory)}
    assert set(TRAIN_HELP) - fields == set()
    assert set(TRAIN_CHOICES) - fields == set()


def test_routing_method_help_is_the_methods_table():
    action = next(a for a in build_parser()._actions if a.dest == "routing_method")
    assert action.metavar == "{" + ",".join(ROUTING_METHODS) + "}"
    listed = action.help.split(". ", 1)[1].rsplit(" (default:", 1)[0].split(" | ")
    assert [tuple(entry.split(": ", 1)) for entry in listed] == \
        [(name, method.summary.replace("%", "%%")) for name, method in ROUTING_METHODS.items()]


def _accepted_values(section, field_name):
    """The values a section's validation names when ``field_name`` is set to a bad one;
    ``None`` if it does not check the field against a fixed list."""
    setattr(section, field_name, "not-a-choice")
    try:
        section.validate()
    except ValueError as err:
        match = re.search(r"must be one of (.*?); got", str(err))
        if match and f"--{field_name.replace('_', '-')}" in str(err):
            return tuple(v for v in match.group(1).split(", ") if v != "None")
    return None


def test_choice_lists_match_what_validation_accepts():
    found = {}
    for section in dataclasses.fields(RunConfig):
        for field in dataclasses.fields(section.default_factory):
            if typing.get_type_hints(section.default_factory)[field.name] in (str, str | None):
                accepted = _accepted_values(section.default_factory(), field.name)
                if accepted is not None:
                    found[field.name] = accepted
    assert found == {k: tuple(v) for k, v in TRAIN_CHOICES.items()}
