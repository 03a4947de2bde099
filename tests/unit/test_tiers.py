"""The tier table (tests/tiers.py): markers by path or test id; stale entries stop the run."""

import pathlib

import pytest

from tests import tiers


def test_markers_by_directory_file_and_test_id(monkeypatch):
    monkeypatch.setattr(tiers, "TIERS", {"tests/gpu/": ("gpu", "slow"),
                                         "tests/a/test_b.py::test_c": ("distributed", "slow")})
    monkeypatch.setattr(tiers, "FAST_TIER_EXCEPTIONS", ("tests/gpu/test_quick.py",))
    assert tiers.markers_for("tests/gpu/test_x.py::test_y[bf16]") == {"gpu", "slow"}
    assert tiers.markers_for("tests/a/test_b.py::test_c[2]") == {"distributed", "slow"}
    assert tiers.markers_for("tests/a/test_b.py::test_d") == set()
    assert tiers.markers_for("tests/gpu/test_quick.py::test_z") == set()


def test_an_entry_naming_a_missing_path_is_refused(monkeypatch, tmp_path):
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "test_here.py").write_text("")
    monkeypatch.setattr(tiers, "TIERS", {"tests/unit/test_here.py::test_a": ("slow",),
                                         "tests/unit/test_gone.py": ("slow",)})
    monkeypatch.setattr(tiers, "FAST_TIER_EXCEPTIONS", ())
    with pytest.raises(pytest.UsageError, match=r"test_gone\.py"):
        tiers.check_tier_table(str(tmp_path))


def test_every_entry_names_an_existing_path():
    tiers.check_tier_table(str(pathlib.Path(__file__).parents[2]))
