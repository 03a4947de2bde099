"""Whole-checkpoint conversions, streamed: HF safetensors -> Megatron ``torch_dist`` and back.

``hf_to_megatron`` reads the HF tensors of one Megatron tensor at a time and writes it before
reading the next; ``megatron_to_hf`` reads a bounded group of one layer's tensors at a time and
streams them into HF shards whose headers were planned up front. Everything is checked (architecture, shard files,
names, shapes, layout) before any tensor data is read.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import time

import torch

from megatron_pr2.convert.adapter import StateDictAdapter
from megatron_pr2.convert.dist_checkpoint import (
    PlannedTensor,
    check_storage_files,
    read_content_metadata,
    read_tensor_metadata,
    read_tensors,
    require_dist_checkpoint,
    write_dist_checkpoint,
)
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_checkpoint import (
    HfCheckpoint,
    HfShardWriter,
    copy_hf_assets,
    plan_shards,
)
from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.convert.rules import TensorRule
from megatron_pr2.convert.sharding import TargetParallelism, dist_key
from megatron_pr2.convert.staging import check_output_dir, staged_output
from megatron_pr2.models.hf_config import load_hf_config
from megatron_pr2.progress import describe_seconds, seconds_left

logger = logging.getLogger(__name__)

HF_CONFIG_NAME = "hf_config.json"   # the HF config, kept beside the Megatron checkpoint
ASSETS_DIR = "hf_assets"            # tokenizer files etc., restored by megatron_to_hf
FORMAT_NAME = "megatron_pr2.convert"
FORMAT_VERSION = 1


@dataclasses.dataclass
class ConversionStats:
    """What a conversion moved and how fast."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / 1e9 / max(self.seconds, 1e-9)


class _Progress:
    """Logs tensors / bytes done and throughput, at most every ``interval`` seconds."""

    def __init__(self, what: str, total_tensors: int, total_bytes: int, interval: float = 5.0):
        self.what, self.total_tensors, self.total_bytes = what, total_tensors, total_bytes
        self.interval = interval
        self.stats = ConversionStats()
        self._start = self._last = time.perf_counter()

    def update(self, tensors: int, bytes_in: int, bytes_out: int) -> None:
        self.stats.tensors += tensors
        self.stats.bytes_read += bytes_in
        self.stats.bytes_written += bytes_out
        now = time.perf_counter()
        self.stats.seconds = now - self._start
        if now - self._last >= self.interval:
            self._last = now
            left = seconds_left(self.stats.bytes_written, self.total_bytes, self.stats.seconds)
            logger.info("%s: %d/%d tensors, %.2f/%.2f GB, %.2f GB/s, about %s left", self.what,
                        self.stats.tensors, self.total_tensors, self.stats.bytes_written / 1e9,
                        self.total_bytes / 1e9, self.stats.gb_per_s, describe_seconds(left))


# ---------------------------------------------------------------------------- HF -> Megatron
def _check_hf_names(adapter: StateDictAdapter, ckpt: HfCheckpoint) -> None:
    expected = {name for rule in adapter.rules for name in rule.hf_names}
    present = set(ckpt.names)
    missing = [n for rule in adapter.rules for n in rule.hf_names if n not in present]
    unexpected = sorted(n for n in present - expected if not adapter.hf_ignored(n))
    if missing:
        raise ConversionError(f"HF checkpoint {ckpt.hf_dir} lacks {len(missing)} tensors the "
                              f"config implies: {', '.join(missing[:6])}")
    if unexpected:
        raise ConversionError(f"HF checkpoint {ckpt.hf_dir} has {len(unexpected)} tensors that "
                              f"are not in the {adapter.architecture} key table: "
                              f"{', '.join(unexpected[:6])}")
    for rule in adapter.rules:
        rule.check_hf_shapes([ckpt.shapes[n] for n in rule.hf_names])


def _produce(ckpt: HfCheckpoint, rule: TensorRule) -> list[torch.Tensor]:
    return rule.to_megatron_blocks([ckpt.tensor(name) for name in rule.hf_names])


def _planned_tensors(adapter: StateDictAdapter, ckpt: HfCheckpoint, target: TargetParallelism,
                     dtype: torch.dtype | None) -> list[PlannedTensor]:
    planned = []
    for rule in adapter.rules:
        planned.append(PlannedTensor(
            name=rule.megatron_name,
            where=dist_key(rule.megatron_name, adapter.spec.num_experts),
            shape=rule.megatron_shape,
            dtype=dtype or ckpt.dtypes[rule.hf_names[0]],
            tp_axis=rule.tp_axis,
            glu=rule.glu,
            tp=target.etp if rule.expert is not None else target.tensor_model_parallel_size,
            produce=functools.partial(_produce, ckpt, rule),
            nbytes_in=sum(ckpt.nbytes(n) for n in rule.hf_names),
        ))
    return planned


def hf_to_megatron(hf_dir: str, out_dir: str, target: TargetParallelism | None = None,
                   dtype: torch.dtype | None = None) -> ConversionStats:
    """Convert an HF safetensors checkpoint into a Megatron ``torch_dist`` checkpoint.

    Args:
        hf_dir: HF checkpoint directory (``config.json`` + safetensors, sharded or not).
        out_dir: new or empty output directory.
        target: the parallel layout to chunk for: validated against the model, recorded in the metadata
            and used to chunk tensors; any other layout can still load the result.
        dtype: storage dtype (default: keep the HF dtype of each tensor).

    Raises:
        ConversionError / UnsupportedConfigError: with the reason, before any data is written.
    """
    target = target or TargetParallelism()
    ckpt = HfCheckpoint(hf_dir)
    adapter = adapter_for(ckpt.config)
    target.validate(adapter.spec)
    _check_hf_names(adapter, ckpt)
    check_output_dir(out_dir)
    planned = _planned_tensors(adapter, ckpt, target, dtype)
    total = sum(math.prod(p.shape) * p.dtype.itemsize for p in planned)
    progress = _Progress("hf-to-megatron", len(planned), total)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": adapter.architecture,
        "parallel_layout": target.as_dict(),
        "source": os.path.abspath(hf_dir),
    }
    with staged_output(out_dir) as staging:
        write_dist_checkpoint(
            staging, planned, metadata,
            on_tensor_done=lambda p: progress.update(1, p.nbytes_in,
                                                     math.prod(p.shape) * p.dtype.itemsize))
        with open(os.path.join(staging, HF_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(ckpt.config, handle, indent=2, sort_keys=True)
        copy_hf_assets(hf_dir, os.path.join(staging, ASSETS_DIR))
    logger.debug("wrote %s (%d tensors, %.2f GB) in %.1f s", out_dir, progress.stats.tensors,
                progress.stats.bytes_written / 1e9, progress.stats.seconds)
    return progress.stats


# ---------------------------------------------------------------------------- Megatron -> HF
def read_megatron_hf_config(megatron_dir: str) -> dict:
    """The HF config kept beside a converted Megatron checkpoint."""
    path = os.path.join(megatron_dir, HF_CONFIG_NAME)
    if not os.path.isfile(path):
        raise ConversionError(f"no {HF_CONFIG_NAME} in {megatron_dir}; pass the model's HF "
                              "config (--hf-config)")
    return load_hf_config(path)


def _check_megatron_tensors(adapter: StateDictAdapter, metadata: dict, predictive_gate: bool,
                            ckpt_dir: str) -> None:
    spec = adapter.spec
    wanted = [(r.megatron_name, r.megatron_shape) for r in adapter.rules]
    if predictive_gate:
        wanted += [(n, adapter.predictor_shape()) for n in adapter.predictor_names()]
    missing = []
    for name, shape in wanted:
        where = dist_key(name, spec.num_experts)
        if where.key not in metadata:
            missing.append(where.key)
            continue
        stored = metadata[where.key][0]
        if tuple(stored) != where.global_shape(shape):
            raise ConversionError(f"shape mismatch for {where.key}: checkpoint has "
                                  f"{tuple(stored)}, the config implies {where.global_shape(shape)}")
    if missing:
        hint = (" (--predictive-gate needs the PR2 predictor weights)"
                if any(k.endswith("predictor.weight") for k in missing) else "")
        raise ConversionError(f"Megatron checkpoint {ckpt_dir} lacks {len(sorted(set(missing)))} "
                              f"tensors: {', '.join(sorted(set(missing))[:6])}{hint}")


def _hf_outputs(adapter: StateDictAdapter, rule: TensorRule, tensors: dict,
                predictive_gate: bool):
    if predictive_gate and adapter.is_router(rule):
        gate = adapter.predictive_gate_rule(rule)
        return [(gate.hf_name, gate.to_hf(tensors[gate.router_name], tensors[gate.predictor_name]))]
    return list(zip(rule.hf_names, rule.to_hf(tensors[rule.megatron_name])))


def _requests(adapter: StateDictAdapter, rules: list[TensorRule], metadata: dict,
              predictive_gate: bool):
    num_experts = adapter.spec.num_experts
    names = [(r.megatron_name, r.megatron_shape) for r in rules]
    if predictive_gate:
        names += [(adapter.predictor_name(r.layer), adapter.predictor_shape())
                  for r in rules if adapter.is_router(r)]
    for name, shape in names:
        where = dist_key(name, num_experts)
        yield name, where, shape, metadata[where.key][1]


def _read_groups(adapter: StateDictAdapter, rules: list[TensorRule], metadata: dict,
                 max_bytes: int) -> list[list[TensorRule]]:
    """Rules of one layer packed into groups of about ``max_bytes`` of stored tensors.

    All rules sharing a stacked expert key (one weight of every routed expert of a layer) stay
    in one group: Megatron's loader builds a key's expert grid from a single request. Output
    tensors are written in the returned order, so nothing waits in memory for its turn.
    """
    groups = []
    for _, layer_rules in itertools.groupby(rules, key=lambda r: r.layer):
        by_key: dict[str, list[TensorRule]] = {}
        for rule in layer_rules:
            by_key.setdefault(dist_key(rule.megatron_name, adapter.spec.num_experts).key,
                              []).append(rule)
        group, used = [], 0
        for key, key_rules in by_key.items():
            size = sum(math.prod(r.megatron_shape) for r in key_rules) * metadata[key][1].itemsize
            if group and used + size > max_bytes:
                groups.append(group)
                group, used = [], 0
            group += key_rules
            used += size
        groups.append(group)
    return groups


def _hf_config_for_output(config: dict, dtypes: set) -> dict:
    config = dict(config)
    if len(dtypes) == 1:
        dtype_name = str(next(iter(dtypes))).replace("torch.", "")
        for field in ("dtype", "torch_dtype"):
            if field in config or field == "torch_dtype":
                config[field] = dtype_name
    return config


def _write_hf(adapter: StateDictAdapter, groups, metadata: dict, megatron_dir: str,
              out_dir: str, shards, out_dtype: dict, predictive_gate: bool) -> _Progress:
    """Read the Megatron tensors group by group and write them as HF shards into ``out_dir``."""
    writer = HfShardWriter(out_dir, shards)
    progress = _Progress("megatron-to-hf", len(out_dtype), writer.total_bytes)
    for group in groups:
        tensors = read_tensors(megatron_dir, _requests(adapter, group, metadata, predictive_gate))
        bytes_in = sum(t.numel() * t.element_size() for t in tensors.values())
        for rule in group:
            for name, tensor in _hf_outputs(adapter, rule, tensors, predictive_gate):
                tensor = tensor.to(out_dtype[name])
                writer.add(name, tensor)
                progress.update(1, 0, tensor.numel() * tensor.element_size())
        progress.update(0, bytes_in, 0)
    writer.close()
    return progress


def megatron_to_hf(megatron_dir: str, out_dir: str, predictive_gate: bool = False,
                   hf_config=None, dtype: torch.dtype | None = None,
                   max_shard_bytes: int = 5 * 1024**3,
                   read_group_bytes: int = 256 * 1024**2) -> ConversionStats:
    """Convert a Megatron ``torch_dist`` checkpoint (converted or saved by the trainer) to HF.

    Args:
        megatron_dir: the distributed checkpoint directory.
        out_dir: HF output directory (safetensors shards, index, ``config.json``, assets).
        predictive_gate: write ``W_r + W_p`` as each router's gate weight (PR2 in the rollout
            engine); the checkpoint must hold the PR2 predictor weights.
        hf_config: HF config (dict / path) when the checkpoint has no ``hf_config.json``.
        dtype: output dtype (default: the stored dtype of each tensor).
        max_shard_bytes: maximum HF shard size.
        read_group_bytes: Megatron tensors read per step (peak memory is about this).
    """
    require_dist_checkpoint(megatron_dir)
    check_output_dir(out_dir)
    if hf_config is None:
        config = read_megatron_hf_config(megatron_dir)
    else:
        config = load_hf_config(hf_config)
    adapter = adapter_for(config)
    metadata = read_tensor_metadata(megatron_dir)
    check_storage_files(megatron_dir)
    _check_megatron_tensors(adapter, metadata, predictive_gate, megatron_dir)
    groups = _read_groups(adapter, adapter.rules, metadata, read_group_bytes)
    entries = []
    for rule in (rule for group in groups for rule in group):
        stored = metadata[dist_key(rule.megatron_name, adapter.spec.num_experts).key][1]
        entries += [(name, shape, dtype or stored)
                    for name, shape in zip(rule.hf_names, rule.hf_shapes)]
    out_dtype = {name: entry_dtype for name, _, entry_dtype in entries}
    with staged_output(out_dir) as staging:
        progress = _write_hf(adapter, groups, metadata, megatron_dir, staging,
                             plan_shards(entries, max_shard_bytes), out_dtype, predictive_gate)
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(_hf_config_for_output(config, set(out_dtype.values())), handle, indent=2,
                      sort_keys=True)
        assets = os.path.join(megatron_dir, ASSETS_DIR)
        if os.path.isdir(assets):
            copy_hf_assets(assets, staging)
    logger.debug("wrote %s (%d tensors, %.2f GB) in %.1f s", out_dir, progress.stats.tensors,
                progress.stats.bytes_written / 1e9, progress.stats.seconds)
    return progress.stats


def describe_megatron_checkpoint(megatron_dir: str) -> dict:
    """Content metadata of a checkpoint (format, architecture, recorded parallel layout)."""
    require_dist_checkpoint(megatron_dir)
    return read_content_metadata(megatron_dir)
