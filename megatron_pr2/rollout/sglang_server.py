"""Start and stop a local SGLang server, bounded in time: on CPU from its own venv
(``tools/launch_sglang.py``), or with ``gpu=True`` SGLang's own ``sglang.launch_server`` from
this interpreter (a GPU install of ``sglang``; no CPU shims).

The server runs in a new process session so that :meth:`SGLangServer.stop` ends its whole tree
(the HTTP server, the scheduler and the detokenizer) and nothing else.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

import requests

from megatron_pr2.platform.distributed import free_port
from megatron_pr2.rollout.sglang_weight_api import SGLANG_VERSION

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VENV = os.path.join(REPO_ROOT, ".venv-sglang")
LAUNCHER = os.path.join(REPO_ROOT, "tools", "launch_sglang.py")
READY_MARKER = "sglang-cpu-ready"
API_KEY_ENV = "SGLANG_API_KEY"  # tools/launch_sglang.py passes it to SGLang's --api-key
GPU_FLAGS = ("--skip-tokenizer-init", "--enable-return-routed-experts")  # as the CPU launcher
# ``python -c GPU_BOOTSTRAP <lifetime> <SGLang args>``: SGLang's entry point with --api-key from
# the environment (never on a command line) and a timer that kills the whole process group after
# <lifetime> seconds, whatever becomes of the process that started it.
GPU_BOOTSTRAP = f"""\
import os, runpy, signal, sys, threading
if os.getpgid(0) != os.getpid():
    os.setpgrp()  # lead a group of its own: the timer must never reach the caller's
timer = threading.Timer(float(sys.argv.pop(1)), os.killpg, (os.getpgid(0), signal.SIGKILL))
timer.daemon = True
timer.start()
if os.environ.get("{API_KEY_ENV}"):
    sys.argv += ["--api-key", os.environ["{API_KEY_ENV}"]]
runpy.run_module("sglang.launch_server", run_name="__main__")
"""


class SGLangServerError(RuntimeError):
    """The server could not be started."""


def sglang_venv_ready(venv: str = DEFAULT_VENV) -> bool:
    """Whether ``tools/sglang_env.sh`` completed for ``venv``."""
    return os.path.exists(os.path.join(venv, READY_MARKER)) and os.path.exists(_python(venv))


def sglang_importable() -> bool:
    """Whether ``sglang`` is installed in this interpreter (a GPU install; not imported here)."""
    return importlib.util.find_spec("sglang") is not None


def _python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


class SGLangServer:
    """One SGLang server process on the loopback interface.

    Args:
        model_path: HF checkpoint directory (``config.json`` + safetensors).
        venv: SGLang's venv (built by ``tools/sglang_env.sh``).
        port: TCP port (default: a free one).
        startup_timeout: seconds to wait for ``/health_generate`` to answer 200.
        max_lifetime: the server kills itself after this many seconds regardless.
        extra_args: further SGLang arguments.
        log_path: where the server's output goes (default: a temp file).
        api_key: the key the server requires (``Authorization: Bearer``); None: no key.
        gpu: run ``sglang.launch_server`` from this interpreter (``venv`` unused) with
            :data:`GPU_FLAGS`; device, dtype and memory flags go in ``extra_args``.
    """

    def __init__(self, model_path: str, *, venv: str = DEFAULT_VENV, port: int | None = None,
                 host: str = "127.0.0.1", startup_timeout: float = 240.0,
                 max_lifetime: float = 1800.0, extra_args: tuple[str, ...] = (),
                 log_path: str | None = None, api_key: str | None = None, gpu: bool = False):
        self.model_path = model_path
        self.gpu = gpu
        self.api_key = api_key
        self.venv = venv
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.max_lifetime = max_lifetime
        self.extra_args = tuple(extra_args)
        self.log_path = log_path or tempfile.mkstemp(prefix="sglang-", suffix=".log")[1]
        self._process: subprocess.Popen | None = None
        self._deadline = 0.0

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.gpu:
            return [sys.executable, "-c", GPU_BOOTSTRAP, str(self.max_lifetime), "--model-path",
                    self.model_path, "--host", self.host, "--port", str(self.port), *GPU_FLAGS,
                    *self.extra_args]
        cmd = [_python(self.venv), LAUNCHER, "--model-path", self.model_path, "--host", self.host,
               "--port", str(self.port), "--max-lifetime", str(self.max_lifetime)]
        if self.extra_args:
            cmd += ["--", *self.extra_args]
        return cmd

    def start(self) -> SGLangServer:
        """Launch and wait until the server generates; raise with the log tail otherwise."""
        return self.launch().wait_ready()

    def launch(self) -> SGLangServer:
        """Start the server process without waiting (see :meth:`wait_ready`)."""
        self._check_installed()
        dropped = (API_KEY_ENV, "SGLANG_USE_CPU_ENGINE") if self.gpu else (API_KEY_ENV,)
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        if self.api_key:
            env[API_KEY_ENV] = self.api_key  # read by the launcher, never on a command line
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env=env)
        self._deadline = time.monotonic() + self.startup_timeout
        logger.info("started SGLang (pid %d) on %s, log %s", self._process.pid, self.address, self.log_path)
        return self

    def _check_installed(self) -> None:
        if self.gpu and not sglang_importable():
            raise SGLangServerError(f"sglang is not installed in {sys.executable}: pip install "
                                    f"sglang=={SGLANG_VERSION}")
        if not self.gpu and not sglang_venv_ready(self.venv):
            raise SGLangServerError(f"no SGLang venv at {self.venv}: run tools/sglang_env.sh")

    def wait_ready(self) -> SGLangServer:
        """Wait until the launched server generates (``startup_timeout`` from its launch)."""
        while time.monotonic() < self._deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise SGLangServerError(f"SGLang exited with code {code}:\n{self.log_tail()}")
            if self._generates():
                return self
            time.sleep(1.0)
        self.stop()
        raise SGLangServerError(f"SGLang did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def _generates(self) -> bool:
        try:
            return requests.get(self.address + "/health_generate", timeout=(2, 30)).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def stop(self, grace: float = 10.0) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                if not _group_alive(process.pid):
                    break
            except subprocess.TimeoutExpired:
                continue
        _kill_group(process.pid)
        logger.info("stopped SGLang (pid %d)", process.pid)

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once (a crash, for fault tests)."""
        process, self._process = self._process, None
        if process is not None:
            _kill_group(process.pid)
            process.wait(timeout=30)
            logger.info("killed SGLang (pid %d)", process.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SGLangServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left in the group (children that outlived the leader)."""
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
