#!/usr/bin/env python
"""Conversion throughput (GB/s) and peak memory of tools/convert.py on a few GB of random weights.

Writes a random, sharded Qwen3-MoE HF checkpoint of about ``--size-gb`` into a work dir, then
runs ``hf-to-megatron`` and ``megatron-to-hf`` each in its own process and reports wall time
and GB/s (checkpoint bytes / time) for the whole process and for the conversion alone (as
tools/convert.py reports it, without interpreter start-up and imports), and the process's peak
resident memory next to the peak of a process that only imports the converter (the floor).
Not part of CI.

    .venv/bin/python tools/bench_convert.py --size-gb 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "convert.py")

# Qwen3-30B-A3B-like widths, fewer experts and layers; the layer count is set from --size-gb.
BASE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 32768,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}


def _config_for(size_gb: float) -> dict:
    cfg = dict(BASE_CONFIG)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = (2 * hidden * q + 2 * hidden * kv
                 + cfg["num_experts"] * (3 * hidden * cfg["moe_intermediate_size"] + hidden)) * 2
    fixed = 2 * vocab * hidden * 2
    cfg["num_hidden_layers"] = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return cfg


# Runs a script (or only imports) in a fresh process and prints its peak RSS (VmHWM, which,
# unlike getrusage's ru_maxrss, does not carry over the parent's memory across fork + exec).
_WRAPPER = """
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    if script.endswith('.py'):
        runpy.run_path(script, run_name='__main__')
    else:
        exec(script)
except SystemExit as stop:
    code = stop.code or 0
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print('PEAK_RSS_KB', hwm, file=sys.stderr)
sys.exit(code)
"""


def _run(argv: list[str]) -> tuple[float, float | None, int]:
    """Run ``python <script or code> args``; return (wall seconds, conversion seconds reported
    by tools/convert.py (None if it printed none), peak RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - start
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0 or not peak:
        raise SystemExit(f"command failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    reported = re.search(r" in ([0-9.]+) s ", proc.stdout)
    return seconds, float(reported.group(1)) if reported else None, int(peak[0].split()[1]) * 1024


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.0, help="checkpoint size (bf16)")
    parser.add_argument("--shard-size", default="1GB", help="HF shard size (input and output)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    import torch

    from megatron_pr2.convert.random_init import write_random_hf_checkpoint

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert import _size

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf_dir, mg_dir, back_dir = (os.path.join(workdir, d) for d in ("hf", "megatron", "hf_back"))
    try:
        cfg = _config_for(args.size_gb)
        print(f"writing a random {cfg['num_hidden_layers']}-layer Qwen3-MoE checkpoint "
              f"({cfg['num_experts']} experts) to {hf_dir} ...", flush=True)
        total = write_random_hf_checkpoint(cfg, hf_dir, _size(args.shard_size), torch.bfloat16)
        print(f"  {total / 1e9:.2f} GB in {len(os.listdir(hf_dir)) - 2} shards", flush=True)

        imports = "import megatron_pr2.convert, megatron.core.dist_checkpointing"
        floor_s, _, floor_rss = _run([imports])
        rows = [("import only (floor)", 0, floor_s, None, floor_rss)]
        wall, work, rss = _run([CONVERT, "--quiet", "hf-to-megatron", "--hf-dir", hf_dir,
                                "--out", mg_dir, "--tp", str(args.tp), "--ep", str(args.ep)])
        rows.append(("hf-to-megatron", _dir_bytes(mg_dir), wall, work, rss))
        wall, work, rss = _run([CONVERT, "--quiet", "megatron-to-hf", "--megatron-dir",
                                mg_dir, "--out", back_dir, "--max-shard-size", args.shard_size])
        rows.append(("megatron-to-hf", _dir_bytes(back_dir), wall, work, rss))

        print(f"\ncheckpoint {total / 1e9:.2f} GB bf16, HF shards {args.shard_size}, "
              f"layout TP={args.tp} EP={args.ep}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'step':<22}{'GB':>6}{'wall s':>8}{'GB/s':>7}{'convert s':>11}{'GB/s':>7}"
              f"{'peak RSS GB':>13}{'above floor':>13}")
        for name, nbytes, secs, work, peak in rows:
            gb = nbytes / 1e9
            wall_rate = f"{gb / secs:7.2f}" if nbytes else f"{'':>7}"
            work_cols = f"{work:11.1f}{gb / work:7.2f}" if work else f"{'':>18}"
            print(f"{name:<22}{gb:6.2f}{secs:8.1f}{wall_rate}{work_cols}{peak / 1e9:13.2f}"
                  f"{(peak - floor_rss) / 1e9:13.2f}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
