"""Weight-sync set-up facts that break a multi-node run: the rendezvous address of a pushing
rank, the SGLang version the servers must run (probed once), the version pins agreeing.

References: the kernel's own route choice (``ip -o route get``), fake servers answering like
SGLang with and without ``/begin_weight_update``, the pins as written in the shell scripts.
"""

import os
import re
import shutil
import socket
import subprocess
import types

import pytest

from megatron_pr2.rollout.sglang_weight_api import (
    SGLANG_VERSION,
    SGLangWeightAPI,
    WeightUpdateError,
)
from megatron_pr2.weight_sync.build import ADDRESS_ENV, master_address
from tests.fake_sglang import FakeSGLang, WeightServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOTE = "10.1.2.3"


def servers(*hosts):
    return types.SimpleNamespace(addresses=tuple(f"http://{h}:30000" for h in hosts))


def kernel_source_address(host):
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command to ask the kernel for its route")
    run = subprocess.run(["ip", "-o", "route", "get", host], capture_output=True, text=True,
                         check=False)
    match = re.search(r"\bsrc (\S+)", run.stdout)
    if run.returncode or not match:
        pytest.skip(f"no route to {host} on this machine")
    return match.group(1)


def test_remote_servers_get_the_address_on_the_route_to_them_not_the_hosts_file_one(
        monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")  # stock Ubuntu
    assert master_address(servers(REMOTE), None) == kernel_source_address(REMOTE)


def test_loopback_servers_flag_and_per_node_override(monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    assert master_address(servers("127.0.0.1", "localhost"), None) == "127.0.0.1"
    assert master_address(servers(REMOTE), "10.0.0.7") == "10.0.0.7"
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.9")  # this node's own address wins over the flag
    assert master_address(servers(REMOTE), "10.0.0.7") == "10.0.0.9"


def test_a_server_without_update_sessions_is_refused_naming_the_version():
    def old_sglang(path, body, count):
        return (404, {"detail": "Not Found"}) if path == "/begin_weight_update" else (200, {})

    current, old = FakeSGLang(WeightServer()), FakeSGLang(old_sglang)
    try:
        SGLangWeightAPI(current.address).require_update_session()
        with pytest.raises(WeightUpdateError, match=re.escape(
                f"{old.address} has no /begin_weight_update: its SGLang is older than the "
                f"weight sync needs; run sglang=={SGLANG_VERSION}")):
            SGLangWeightAPI(old.address).require_update_session()
        assert ("/begin_weight_update", None) in current.requests  # a GET: nothing changed
    finally:
        current.stop()
        old.stop()


def test_the_sglang_pins_agree():
    with open(os.path.join(REPO, "tools", "sglang_env.sh"), encoding="utf-8") as handle:
        assert f'sglang_spec="sglang=={SGLANG_VERSION}"' in handle.read()
    launcher = os.path.join(REPO, "examples", "pr2", "launch_sglang_servers.sh")
    with open(launcher, encoding="utf-8") as handle:
        assert f"SGLANG_VERSION={SGLANG_VERSION}  #" in handle.read()
    with open(os.path.join(REPO, "tools", "gpu_smoke.sh"), encoding="utf-8") as handle:
        smoke = handle.read()  # WITH_SGLANG=1 reads the pin from sglang_weight_api.py with sed
    assert "s/^SGLANG_VERSION = " in smoke and '"sglang==$pin"' in smoke
    api = os.path.join(REPO, "megatron_pr2", "rollout", "sglang_weight_api.py")
    pin = subprocess.run(["sed", "-n", r's/^SGLANG_VERSION = "\(.*\)"$/\1/p', api],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert pin == SGLANG_VERSION
