"""``SGLangServer(gpu=True)`` on CPU, with a fake ``sglang.launch_server`` (an HTTP server that
answers 200 and starts a child): SGLang's argv and key, the lifetime and stop() end the whole
process group, and a missing ``sglang`` is a clear error."""

import json
import time

import pytest

from megatron_pr2.rollout import sglang_server
from megatron_pr2.rollout.sglang_server import (
    GPU_FLAGS,
    SGLangServer,
    SGLangServerError,
)
from tests.procfs import alive

FAKE_LAUNCH_SERVER = '''
import json, os, subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

if __name__ == "__main__":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["FAKE_SGLANG_RECORD"], "w") as handle:
        json.dump({"argv": sys.argv[1:], "child": child.pid,
                   "cpu_engine": os.environ.get("SGLANG_USE_CPU_ENGINE")}, handle)

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Ok).serve_forever()
'''


@pytest.fixture
def fake_sglang(tmp_path, monkeypatch):
    """A fake ``sglang`` package importable here and in the server; the record file's path."""
    package = tmp_path / "fake" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(FAKE_LAUNCH_SERVER)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")  # the CPU shim's switch: never passed on
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_SGLANG_RECORD", str(record))
    return record


def _wait_dead(pid: int, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_gpu_server_gets_its_flags_and_the_key_and_stop_ends_its_group(fake_sglang):
    server = SGLangServer("/models/tiny", gpu=True, api_key="secret-key", startup_timeout=60,
                          extra_args=("--dtype", "bfloat16"))
    assert "secret-key" not in " ".join(server.command())
    try:
        server.start()
        record = json.loads(fake_sglang.read_text())
    finally:
        server.stop()
    assert record["argv"] == ["--model-path", "/models/tiny", "--host", "127.0.0.1", "--port",
                              str(server.port), *GPU_FLAGS, "--dtype", "bfloat16",
                              "--api-key", "secret-key"]
    assert record["cpu_engine"] is None
    assert _wait_dead(record["child"]), "stop() left SGLang's child running"


def test_gpu_server_kills_its_group_after_its_lifetime(fake_sglang):
    server = SGLangServer("/models/tiny", gpu=True, startup_timeout=60, max_lifetime=3)
    try:
        server.start()
        process = server._process
        process.wait(timeout=30)
        record = json.loads(fake_sglang.read_text())
        assert _wait_dead(record["child"]), "the lifetime left SGLang's child running"
    finally:
        server.stop()


def test_gpu_server_without_sglang_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sglang_server, "sglang_importable", lambda: False)
    server = SGLangServer("/models/tiny", gpu=True)
    with pytest.raises(SGLangServerError, match=r"sglang is not installed in .*: pip install "
                                                r"sglang==\d"):
        server.launch()
    assert server._process is None
