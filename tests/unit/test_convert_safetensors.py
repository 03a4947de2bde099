"""The streaming safetensors reader/writer against the safetensors library itself."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_checkpoint import HfShardWriter, plan_shards
from megatron_pr2.convert.safetensors_io import (
    SafetensorsReader,
    SafetensorsStreamWriter,
)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=gen).bfloat16(),
        "b.bias": torch.randn(7, generator=gen),
        "c.count": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.empty": torch.empty(0, 4, dtype=torch.float16),
        "e.half": torch.randn(3, 1, generator=gen).half(),
    }


def test_streamed_file_reads_back_with_the_safetensors_library(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "x.safetensors")
    writer = SafetensorsStreamWriter(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
                                     {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    assert all(loaded[k].dtype == tensors[k].dtype and torch.equal(loaded[k], tensors[k])
               for k in tensors)


def test_reader_reads_files_the_safetensors_library_wrote(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "y.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    reader = SafetensorsReader(path)
    assert reader.metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.read(name), tensor)


def test_writer_refuses_wrong_order_shape_and_incomplete_files(tmp_path):
    entries = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    writer = SafetensorsStreamWriter(str(tmp_path / "z.safetensors"), entries)
    with pytest.raises(ConversionError, match="expected a next, got b"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ConversionError, match=r"a is \(3,\) torch.float32, planned \(2,\)"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ConversionError, match="b was never written"):
        writer.close()


def test_shard_writer_accepts_tensors_out_of_order_and_writes_an_index(tmp_path):
    tensors = _tensors()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    shards = plan_shards(entries, max_shard_bytes=40)
    assert len(shards) > 2 and [e for s in shards for e in s] == entries
    writer = HfShardWriter(str(tmp_path), shards)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    writer.close()
    import json

    with open(tmp_path / "model.safetensors.index.json") as handle:
        weight_map = json.load(handle)["weight_map"]
    loaded = {}
    for shard in set(weight_map.values()):
        loaded.update(load_file(str(tmp_path / shard)))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
