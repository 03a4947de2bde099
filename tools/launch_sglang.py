"""Start an SGLang server on CPU, from SGLang's own venv (built by tools/sglang_env.sh).

Run it with that venv's interpreter, e.g.::

    .venv-sglang/bin/python tools/launch_sglang.py --model-path /tmp/tiny --port 30000 \\
        --max-lifetime 600

The CPU shims (docs/platform.md) are applied at import time of this file, not under
``__main__``: SGLang starts its scheduler and detokenizer with the ``spawn`` start method, and
spawned children re-import this file as ``__mp_main__`` before running, so they get the shims too.

Shims: ``SGLANG_USE_CPU_ENGINE=1``; transformers probes torchvision *before* the import stubs of
``$VENV/cpu-stubs`` (torchvision, sgl_kernel) are put on ``sys.path``; SGLang's pinned host
allocator for CPU is replaced by a plain ``torch.zeros`` allocator (needed by
``--enable-return-routed-experts``).

The server always listens on the loopback address given by ``--host`` (default 127.0.0.1) and
kills its whole process tree after ``--max-lifetime`` seconds. With ``SGLANG_API_KEY`` set in the
environment, the server requires it (SGLang's ``--api-key``: every endpoint but ``/health*``
answers 401 without ``Authorization: Bearer <key>``); the key is added to SGLang's arguments
in-process, so it never shows in the process list. Arguments after ``--`` are passed to SGLang
unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

logger = logging.getLogger("launch_sglang")


def _stub_dir() -> str:
    return os.path.join(sys.prefix, "cpu-stubs")


def _plain_host_allocator(dims, dtype, device="cpu", pin_memory=False, allocator=None, **_):
    """Unpinned CPU allocation in place of SGLang's host-registered one (no CUDA here)."""
    import torch

    return torch.zeros(dims, dtype=dtype, device="cpu")


def apply_cpu_shims() -> None:
    """Make SGLang importable and runnable on CPU (idempotent)."""
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached False before the stub becomes visible
    stubs = _stub_dir()
    if not os.path.isdir(stubs):
        raise RuntimeError(f"import stubs missing at {stubs}: build the venv with tools/sglang_env.sh")
    if stubs not in sys.path:
        sys.path.append(stubs)
    from sglang.srt.mem_cache.pool_host import common as pool_host_common

    pool_host_common.ALLOC_MEMORY_FUNCS["cpu"] = _plain_host_allocator


if os.path.isdir(_stub_dir()):  # only inside the venv built by tools/sglang_env.sh
    apply_cpu_shims()

CPU_FLAGS = [
    "--device", "cpu",
    "--disable-cuda-graph",
    "--disable-overlap-schedule",  # the overlap loop runs an empty MoE batch that fails on CPU
    "--skip-tokenizer-init",  # requests carry input_ids; the tiny test models have no tokenizer
    "--enable-return-routed-experts",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-imports", action="store_true",
                        help="only import the server entry point and exit")
    parser.add_argument("--model-path",
                        help="HF model directory to serve (required unless --check-imports)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=30000, help="port to listen on")
    parser.add_argument("--dtype", default="float32", help="SGLang's model dtype (float32 on CPU)")
    parser.add_argument("--mem-fraction-static", default="0.05",
                        help="share of memory SGLang reserves for weights and KV cache")
    parser.add_argument("--max-total-tokens", type=int, default=16384,
                        help="KV-cache capacity in tokens")
    parser.add_argument("--max-lifetime", type=float, default=1800.0,
                        help="seconds after which the server kills its process tree")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="arguments after -- go to sglang unchanged")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.extra and args.extra[0] == "--":
        args.extra = args.extra[1:]
    if not args.check_imports and not args.model_path:
        parser.error("--model-path is required")
    return args


API_KEY_ENV = "SGLANG_API_KEY"


def sglang_argv(args, api_key: str | None = None) -> list[str]:
    """SGLang's own command line for ``args`` (plus ``--api-key`` when a key is given)."""
    return [
        "--model-path", args.model_path,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--mem-fraction-static", str(args.mem_fraction_static),
        "--max-total-tokens", str(args.max_total_tokens),
        *CPU_FLAGS,
        *(["--api-key", api_key] if api_key else []),
        *args.extra,
    ]


def _start_lifetime_watchdog(seconds: float) -> None:
    from sglang.srt.utils import kill_process_tree

    def expire():
        logger.error("max lifetime of %.0f s reached: stopping the server", seconds)
        kill_process_tree(os.getpid(), include_parent=True)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[launch_sglang] %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(_stub_dir()):
        logger.error("no import stubs at %s: run this file with the python of the venv built by "
                     "tools/sglang_env.sh", _stub_dir())
        return 2
    if args.check_imports:
        import sglang.launch_server  # noqa: F401

        print("sglang server entry point imports")
        return 0
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        logger.warning("listening on non-loopback address %s", args.host)
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is None:
        logger.warning("%s is not set: any local process can replace this server's weights",
                       API_KEY_ENV)
    _start_lifetime_watchdog(args.max_lifetime)
    load_plugins()
    server_args = prepare_server_args(sglang_argv(args, api_key))
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
