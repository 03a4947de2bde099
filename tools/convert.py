#!/usr/bin/env python
"""Convert Qwen3-MoE / Qwen2-MoE checkpoints between Hugging Face and Megatron-Core.

  hf-to-megatron --hf-dir D --out O [--tp N --pp N --ep N]   HF safetensors -> torch_dist
  megatron-to-hf --megatron-dir O --out D [--predictive-gate] torch_dist -> HF safetensors
  verify --hf-dir D --megatron-dir O                         logits / routes of both models

The Megatron checkpoint is a Megatron-Core distributed checkpoint (``torch_dist``): any
TP/PP/EP layout loads it (``megatron_pr2.convert.load_megatron_checkpoint``); the layout given
here is validated, recorded and used to chunk tensors for that layout's ranks.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a fault (also: MEGATRON_PR2_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    to_mg = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron torch_dist")
    to_mg.add_argument("--hf-dir", required=True, help="HF checkpoint directory (safetensors)")
    to_mg.add_argument("--out", required=True, help="new or empty directory")
    to_mg.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    to_mg.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    to_mg.add_argument("--ep", type=int, default=1, help="expert-model-parallel size")
    to_mg.add_argument("--etp", type=int, default=None,
                       help="expert-tensor-parallel size (default: --tp)")
    to_mg.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="storage dtype (default: keep the HF dtype)")

    to_hf = sub.add_parser("megatron-to-hf", help="Megatron torch_dist -> HF safetensors")
    to_hf.add_argument("--megatron-dir", required=True, help="Megatron torch_dist checkpoint")
    to_hf.add_argument("--out", required=True, help="new or empty directory")
    to_hf.add_argument("--predictive-gate", action="store_true",
                       help="write W_r + W_p (router + PR2 predictor) as each gate weight")
    to_hf.add_argument("--hf-config", default=None,
                       help="HF config.json (or its dir) when the checkpoint has no hf_config.json")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="output dtype (default: the stored dtype)")
    to_hf.add_argument("--max-shard-size", type=_size, default=_size("5GB"),
                       help="largest safetensors shard, e.g. 5GB or 500MB (default: 5GB)")

    verify = sub.add_parser("verify", help="compare logits and routes of both checkpoints")
    verify.add_argument("--hf-dir", required=True, help="HF checkpoint directory")
    verify.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    verify.add_argument("--seq-len", type=int, default=32, help="tokens per random test sequence")
    verify.add_argument("--batch-size", type=int, default=2, help="random test sequences")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random test tokens")
    verify.add_argument("--atol", type=float, default=1e-3,
                        help="max allowed |logit difference| (fp32 compute)")
    verify.add_argument("--min-route-agreement", type=float, default=0.99,
                        help="min fraction of tokens with identical top-k experts, per layer")
    return parser


def _hf_to_megatron(args) -> int:
    from megatron_pr2.convert.pipeline import hf_to_megatron
    from megatron_pr2.convert.sharding import TargetParallelism

    layout = TargetParallelism(args.tp, args.pp, args.ep, args.etp)
    stats = hf_to_megatron(args.hf_dir, args.out, layout, DTYPES.get(args.dtype))
    print(f"wrote {args.out}: {stats.tensors} tensors, {stats.bytes_written / 1e9:.3f} GB in "
          f"{stats.seconds:.1f} s ({stats.gb_per_s:.2f} GB/s)")
    return 0


def _megatron_to_hf(args) -> int:
    from megatron_pr2.convert.pipeline import megatron_to_hf

    stats = megatron_to_hf(args.megatron_dir, args.out, predictive_gate=args.predictive_gate,
                           hf_config=args.hf_config, dtype=DTYPES.get(args.dtype),
                           max_shard_bytes=args.max_shard_size)
    print(f"wrote {args.out}: {stats.tensors} tensors, {stats.bytes_written / 1e9:.3f} GB in "
          f"{stats.seconds:.1f} s ({stats.gb_per_s:.2f} GB/s)")
    return 0


def _verify(args) -> int:
    import transformers

    from megatron_pr2.convert.hf_checkpoint import read_hf_config
    from megatron_pr2.convert.loading import load_megatron_checkpoint
    from megatron_pr2.convert.verify import compare_models
    from megatron_pr2.models import build_model
    from megatron_pr2.platform import (
        ParallelConfig,
        default_device,
        initialize_model_parallel,
    )

    device = default_device()
    initialize_model_parallel(ParallelConfig(), seed=args.seed, device=device)
    config = read_hf_config(args.hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        args.hf_dir, dtype=torch.float32, attn_implementation="eager").to(device).eval()
    spec, _, model = build_model(config)
    load_megatron_checkpoint(model, args.megatron_dir)
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, spec.vocab_size, (args.batch_size, args.seq_len),
                           generator=generator).to(device)
    result = compare_models(hf_model, model, tokens)
    print(f"max |logit diff| = {result.max_abs_logit_diff:.3e} (tolerance {args.atol:.1e})")
    per_layer = ", ".join(f"{layer}: {value:.4f}" for layer, value in result.route_agreement.items())
    print(f"top-k route agreement: min {result.min_route_agreement:.4f} "
          f"(required {args.min_route_agreement}); per layer {{{per_layer}}}")
    ok = (result.max_abs_logit_diff <= args.atol
          and result.min_route_agreement >= args.min_route_agreement)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    """Run one command; exit status 0, 2 for bad input, 1 for a run-time fault, 130 for Ctrl-C
    (one ``error:`` line; the traceback only with ``--debug`` or MEGATRON_PR2_DEBUG=1)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_pr2").setLevel(logging.WARNING if args.quiet else logging.INFO)
    # Deprecation chatter of torch.distributed.checkpoint / Megatron-Core, not about this run.
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|megatron)\.")
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_pr2.cli_errors import debug_requested, run_reporting
    from megatron_pr2.convert.errors import ConversionError
    from megatron_pr2.models import UnsupportedConfigError

    commands = {"hf-to-megatron": _hf_to_megatron, "megatron-to-hf": _megatron_to_hf,
                "verify": _verify}
    return run_reporting(lambda: commands[args.command](args),
                         bad_input=(ConversionError, UnsupportedConfigError, FileNotFoundError),
                         faults=(OSError, CheckpointException),
                         debug=args.debug or debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
