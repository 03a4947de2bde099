"""Trainer -> rollout engine weight sync, through the conversion adapters (HF names).

One process: the model's tensors go through the adapter in memory. Several processes: the
ranks write a distributed checkpoint together, rank 0 converts it to an HF directory and the
engine reloads it from disk. In PR2-in-engine mode the gate written is ``W_r + W_p``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from megatron_pr2.convert.loading import model_state_for_export
from megatron_pr2.convert.registry import adapter_for
from megatron_pr2.training.dist_checkpoint import save_model_checkpoint
from megatron_pr2.training.model_setup import unwrap_ddp

logger = logging.getLogger(__name__)


def sync_weights(model, engine, hf_config: dict, predictive_gate: bool, scratch_dir: str | None = None):
    """Push the trainer's current weights to ``engine`` (collective when world size > 1)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world == 1:
        if len(model) != 1:
            raise ValueError("in-memory weight sync expects one model chunk")
        state = model_state_for_export(unwrap_ddp(model[0]))
        tensors = adapter_for(hf_config).to_hf(state.items(), predictive_gate=predictive_gate)
        engine.update_weights(tensors)
        return
    _sync_through_disk(model, engine, hf_config, predictive_gate, scratch_dir)


def _sync_through_disk(model, engine, hf_config, predictive_gate, scratch_dir):
    root = scratch_dir or tempfile.gettempdir()
    megatron_dir = os.path.join(root, "weight_sync_megatron")
    hf_dir = os.path.join(root, "weight_sync_hf")
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(megatron_dir, ignore_errors=True)
        shutil.rmtree(hf_dir, ignore_errors=True)
    torch.distributed.barrier()
    save_model_checkpoint(model, megatron_dir)
    if torch.distributed.get_rank() == 0:
        _convert_in_subprocess(megatron_dir, hf_dir, hf_config, predictive_gate)
        engine.update_weights_from_disk(hf_dir)
    torch.distributed.barrier()


def _convert_in_subprocess(megatron_dir: str, hf_dir: str, hf_config: dict, predictive_gate: bool):
    """Megatron -> HF in a fresh process: Megatron's checkpoint reader is collective over the
    default process group, which the other training ranks are not part of at this moment."""
    config_path = os.path.join(os.path.dirname(megatron_dir), "weight_sync_hf_config.json")
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(hf_config, handle)
    code = ("import sys; from megatron_pr2.convert.pipeline import megatron_to_hf; "
            "megatron_to_hf(sys.argv[1], sys.argv[2], predictive_gate=sys.argv[3] == '1', "
            "hf_config=sys.argv[4])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", code, megatron_dir, hf_dir,
                             "1" if predictive_gate else "0", config_path],
                            env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"weight sync conversion failed:\n{result.stderr[-2000:]}")
