"""The import structure: tools/import_graph.py finds circles and upward imports (checked on a
planted tree), the package has neither, and the docs' package table lists every package."""

import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import import_graph


def _tree(tmp_path, files: dict[str, str]) -> str:
    root = tmp_path / "megatron_pr2"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_a_planted_circle_and_upward_import_are_found(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "platform/__init__.py": "",
        "platform/a.py": "def f():\n    from megatron_pr2.platform import b\n",
        "platform/b.py": "from megatron_pr2.platform.a import f\n",
        "rl/__init__.py": "",
        "rl/x.py": "from megatron_pr2.training.loop import run\n",
        "training/__init__.py": "",
        "training/loop.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                             "    from megatron_pr2.preflight import memory\nrun = 1\n"),
    })
    edges = import_graph.graph(root)
    assert edges["megatron_pr2.platform.a"] == {"megatron_pr2.platform.b"}
    assert edges["megatron_pr2.training.loop"] == set()  # TYPE_CHECKING imports never run
    assert import_graph.cycles(edges) == [["megatron_pr2.platform.a", "megatron_pr2.platform.b"]]
    assert import_graph.upward(edges) == [("megatron_pr2.rl.x", "megatron_pr2.training.loop")]


def test_the_package_has_no_circle_and_no_upward_import(capsys):
    status = import_graph.main([])
    assert status == 0, capsys.readouterr().out


def test_the_docs_package_table_lists_every_package():
    with open(os.path.join(REPO, "docs", "architecture.md")) as handle:
        listed = set(re.findall(r"^\| `megatron_pr2/([\w/]+)/` \|", handle.read(), re.MULTILINE))
    root = os.path.join(REPO, "megatron_pr2")
    packages = {os.path.relpath(d, root) for d, _, files in os.walk(root)
                if "__init__.py" in files and d != root}
    assert packages == listed


@pytest.mark.parametrize("module", ["megatron_pr2.routing.methods",
                                    "megatron_pr2.routing.strategies"])
def test_the_method_table_imports_without_torch(module):
    import subprocess

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert out.stdout.strip() == "False"
