"""Weight-sync benchmark: disk vs in-memory on one model, peak extra memory, and a cost model.

Measured here (one trainer process, the real transports): seconds per GB of the disk path
(safetensors written by the trainer, reloaded by the engine) and of the in-memory path
(in-process engine: tensors; SGLang: ``/update_weights_from_distributed`` over gloo), their
ratio, and the trainer's peak extra resident memory during a sync (sampled RSS minus the RSS
before it) next to the bucket size and the model size. Then a cost model for Qwen3-30B-A3B on
2 x 8 H100 (the layout of ``examples/pr2/qwen3_30b_a3b.yaml``): bytes gathered and put on the
wire per sync, and seconds at the given bandwidths.

    python tools/bench_weight_sync.py                  # in-process engine (bf16)
    python tools/bench_weight_sync.py --engine sglang  # a CPU SGLang server (its venv)
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import tempfile
import threading
import time

import torch

MODEL = {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256,
         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
         "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4, "vocab_size": 4096,
         "max_position_embeddings": 512}
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                 "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                 "vocab_size": 151936, "tie_word_embeddings": False, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                 "norm_topk_prob": True, "rope_theta": 1000000.0}


class PeakRss:
    """Samples this process's resident memory every few milliseconds."""

    def __init__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed buffers of earlier syncs leave the RSS
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def measure(model, engine, hf_config, transport, bucket_mb, repeats, directory):
    from megatron_pr2.weight_sync import WeightSyncOptions, build_weight_syncer

    options = WeightSyncOptions(transport=transport, bucket_bytes=bucket_mb << 20,
                                directory=directory)
    syncer = build_weight_syncer([model], engine, hf_config, options)
    syncer.sync()  # warm-up (groups, page cache)
    seconds, extra = [], []
    for _ in range(repeats):
        with PeakRss() as rss:
            report = syncer.sync()
        seconds.append(report.seconds)
        extra.append(rss.extra)
    syncer.close()
    return report.num_bytes, min(seconds), max(extra), report.num_buckets


def start_engine(kind, hf_config, model, root):
    from megatron_pr2.convert.loading import model_state_for_export
    from megatron_pr2.convert.registry import adapter_for

    if kind == "inprocess":
        from megatron_pr2.rollout.inprocess import InProcessEngine

        return InProcessEngine(hf_config, dtype=torch.bfloat16), None
    import json

    from safetensors.torch import save_file

    from megatron_pr2.rollout.sglang_client import SGLangClient, SGLangClientConfig
    from megatron_pr2.rollout.sglang_server import SGLangServer

    path = os.path.join(root, "served")
    os.makedirs(path)
    tensors = {n: t.to(torch.bfloat16).contiguous() for n, t in
               adapter_for(hf_config).to_hf(model_state_for_export(model).items())}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump({**hf_config, "torch_dtype": "bfloat16"}, handle)
    server = SGLangServer(path, startup_timeout=900, max_lifetime=3600,
                          extra_args=("--dtype", "bfloat16", "--mem-fraction-static", "0.3"))
    server.start()
    client = SGLangClient.for_hf_config([server.address], hf_config,
                                        config=SGLangClientConfig(request_timeout=900))
    return client, server


def cost_model(wire_gbs: float, nvlink_gbs: float, disk_gbs: float) -> None:
    from megatron_pr2.convert.registry import adapter_for

    tp, pp, ep = 4, 2, 8
    adapter = adapter_for(QWEN3_30B_A3B)
    layers = QWEN3_30B_A3B["num_hidden_layers"]
    stage = {0: {"dense": 0, "expert": 0}, 1: {"dense": 0, "expert": 0}}
    for rule in adapter.rules:
        numel = sum(math.prod(s) for s in rule.hf_shapes)
        where = 0 if (rule.layer is None and "embed" in rule.hf_names[0]) or (
            rule.layer is not None and rule.layer < layers // pp) else 1
        stage[where]["expert" if rule.expert is not None else "dense"] += numel
    total = sum(v for s in stage.values() for v in s.values())
    bf16 = 2
    print(f"\ncost model: Qwen3-30B-A3B ({total / 1e9:.2f}B parameters), 2 x 8 H100, "
          f"TP={tp} PP={pp} EP={ep} ETP=1 (examples/pr2/qwen3_30b_a3b.yaml)")
    print(f"  on the wire per sync (bf16, every engine receives it once): "
          f"{total * bf16 / 1e9:.1f} GB")
    worst = 0.0
    for s, parts in stage.items():
        wire = (parts["dense"] + parts["expert"]) * bf16
        gather = (parts["dense"] * (tp - 1) / tp + parts["expert"] * (ep - 1) / ep) * bf16
        seconds = gather / (nvlink_gbs * 1e9) + wire / (wire_gbs * 1e9)
        worst = max(worst, seconds)
        print(f"  stage {s}: gathers {gather / 1e9:.1f} GB to its pushing GPU (TP then EP, "
              f"{nvlink_gbs:g} GB/s) and broadcasts {wire / 1e9:.1f} GB "
              f"({wire_gbs:g} GB/s): {seconds:.1f} s")
    print(f"  in-memory sync, stages in parallel: ~{worst:.1f} s per sync")
    old = total * 4 * (1 + 2) + total * 4  # fp32 ckpt write, convert read+write, engine read
    print(f"  previous disk path (fp32 checkpoint + conversion + reload, {disk_gbs:g} GB/s): "
          f"{old / 1e9:.0f} GB of I/O, ~{old / (disk_gbs * 1e9) / 60:.1f} min per sync")
    disk = total * bf16 * 2
    print(f"  --weight-sync disk (bf16 safetensors written + reloaded): {disk / 1e9:.0f} GB of "
          f"I/O, ~{disk / (disk_gbs * 1e9):.0f} s per sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("inprocess", "sglang"), default="inprocess")
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--wire-gbs", type=float, default=20.0,
                        help="cost model: broadcast bandwidth to the engines (GB/s)")
    parser.add_argument("--nvlink-gbs", type=float, default=150.0,
                        help="cost model: in-node gather bandwidth (GB/s)")
    parser.add_argument("--disk-gbs", type=float, default=2.0,
                        help="cost model: shared file-system bandwidth (GB/s)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from megatron_pr2.models import ModelOptions, build_model
    from megatron_pr2.models.presets import preset
    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel
    from megatron_pr2.routing.router import ReplayRouter

    initialize_model_parallel(ParallelConfig())
    hf_config = preset("tiny-qwen3-moe", **MODEL)
    _, _, model = build_model(hf_config, options=ModelOptions(router_class=ReplayRouter))
    model_bytes = sum(p.numel() for p in model.parameters()) * 2
    with tempfile.TemporaryDirectory() as root:
        engine, server = start_engine(args.engine, hf_config, model, root)
        try:
            in_memory = "tensor" if args.engine == "inprocess" else "distributed"
            rows = {name: measure(model, engine, hf_config, name, args.bucket_mb, args.repeats,
                                  os.path.join(root, "disk"))
                    for name in (in_memory, "disk")}
        finally:
            if server is not None:
                server.stop()
    print(f"model: {model_bytes / 1e6:.0f} MB in bf16; engine: {args.engine}; bucket "
          f"{args.bucket_mb} MB")
    print(f"{'transport':<12} {'GB':>7} {'s':>7} {'s/GB':>7} {'peak extra MB':>14} {'buckets':>8}")
    for name, (nbytes, seconds, extra, buckets) in rows.items():
        print(f"{name:<12} {nbytes / 1e9:7.3f} {seconds:7.2f} {seconds / (nbytes / 1e9):7.2f} "
              f"{extra / 1e6:14.1f} {buckets:8d}")
    memory, disk = rows[in_memory], rows["disk"]
    print(f"disk / in-memory seconds per GB: "
          f"{(disk[1] / disk[0]) / (memory[1] / memory[0]):.2f}x")
    cost_model(args.wire_gbs, args.nvlink_gbs, args.disk_gbs)


if __name__ == "__main__":
    main()
