"""Conversion output appears only when complete: a failure leaves the output path as it was."""

import os

import pytest

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.staging import staged_output


@pytest.mark.parametrize("existing", [False, True], ids=["new", "empty"])
def test_a_failure_mid_write_leaves_nothing_behind(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    with pytest.raises(OSError, match="disk gone"), staged_output(str(out)) as staging:
        assert not os.path.samefile(staging, tmp_path)
        (tmp_path / os.path.basename(staging) / "shard-1").write_bytes(b"half")
        raise OSError("disk gone")
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])
    assert not existing or os.listdir(out) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new", "empty"])
def test_a_complete_output_is_moved_into_place(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    with staged_output(str(out)) as staging:
        (tmp_path / os.path.basename(staging) / "model.safetensors").write_bytes(b"data")
        assert not (out / "model.safetensors").exists()
    assert os.listdir(tmp_path) == ["out"]
    assert (out / "model.safetensors").read_bytes() == b"data"


def test_a_non_empty_output_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(ConversionError, match="is not empty; give a new or empty one"), \
            staged_output(str(tmp_path / "out")):
        raise AssertionError("must not run")
    assert os.listdir(tmp_path) == ["out"]
