"""SGLang's weight-update HTTP endpoints, one server at a time (base URL + optional API key).

Every call checks the answer (HTTP status and ``{"success": true}``) and raises
:class:`WeightUpdateError` naming the server, the endpoint and SGLang's message. The server pool
(health, eviction, retries) wraps these calls; nothing here retries, because a weight update
that half-happened must be redone from the start.
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import requests
import torch

from megatron_pr2.rollout.engine import RolloutError

# The SGLang the weight sync is written and tested against (tools/sglang_env.sh installs it;
# examples/pr2/launch_sglang_servers.sh refuses another): update sessions
# (/begin_weight_update), flattened-bucket broadcasts and routed experts.
SGLANG_VERSION = "0.5.23"


class WeightUpdateError(RolloutError):
    """A server refused or failed a weight-update call."""


def serialize_named_tensors(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """``[(name, tensor)]`` as SGLang's ``/update_weights_from_tensor`` reads it (base64 pickle).

    CUDA tensors travel as CUDA IPC handles (torch's multiprocessing pickler: zero-copy for a
    server on the same host and GPUs); host tensors travel by value with plain pickle (copied
    first, so a view never drags its whole base storage along).
    """
    items = list(named_tensors)
    buffer = io.BytesIO()
    if any(t.is_cuda for _, t in items):
        from torch.multiprocessing.reductions import ForkingPickler

        ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(
            [(name, t.detach().contiguous()) for name, t in items])
    else:
        pickle.dump([(name, t.detach().contiguous().clone()) for name, t in items], buffer,
                    protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class SGLangWeightAPI:
    """The weight-update endpoints of one SGLang server.

    Args:
        base_url: e.g. ``http://10.0.0.5:30000``.
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout: seconds to wait for one answer (a broadcast of one bucket included).
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._session = requests.Session()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _call(self, method: str, path: str, body: Any = None, *, expect_json: bool = True) -> Any:
        url = self.base_url + path
        try:
            response = self._session.request(method, url, json=body, headers=self._headers(),
                                             timeout=(5.0, self.timeout))
        except requests.RequestException as exc:
            raise WeightUpdateError(f"SGLang server {self.base_url}: {method} {path} failed: "
                                    f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            hint = " (wrong or missing API key?)" if response.status_code in (401, 403) else ""
            raise WeightUpdateError(f"SGLang server {self.base_url}: {method} {path}: HTTP "
                                    f"{response.status_code}{hint}: {response.text[:500]}")
        if not expect_json:
            return response.text
        try:
            answer = response.json()
        except ValueError:
            raise WeightUpdateError(f"SGLang server {self.base_url}: {path} answered non-JSON: "
                                    f"{response.text[:200]!r}") from None
        if isinstance(answer, dict) and answer.get("success") is False:
            raise WeightUpdateError(f"SGLang server {self.base_url}: {path} failed: "
                                    f"{answer.get('message', answer)!r}")
        return answer

    # -- server facts ------------------------------------------------------------------------
    def server_info(self) -> dict:
        return self._call("GET", "/server_info")

    def require_update_session(self) -> None:
        """Probe once (no state changes) that the server has ``/begin_weight_update``: a GET
        answers 405 where the POST route exists, 404 where the SGLang is too old."""
        url = self.base_url + "/begin_weight_update"
        try:
            status = self._session.get(url, headers=self._headers(), timeout=(5.0, 30.0)).status_code
        except requests.RequestException as exc:
            raise WeightUpdateError(f"SGLang server {self.base_url}: probing /begin_weight_update "
                                    f"failed: {type(exc).__name__}: {exc}") from None
        if status == 404:
            raise WeightUpdateError(
                f"SGLang server {self.base_url} has no /begin_weight_update: its SGLang is older "
                f"than the weight sync needs; run sglang=={SGLANG_VERSION} on the servers "
                f"(the version tools/sglang_env.sh installs)")

    # -- session -----------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        """Open the update session (SGLang >= 0.5.2x refuses updates outside one)."""
        self._call("POST", "/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._call("POST", "/end_weight_update", {})

    def update_weight_version(self, version: int) -> None:
        """Tag the server's weights: each later answer reports ``version`` in its meta_info."""
        self._call("POST", "/update_weight_version",
                   {"new_version": str(version), "abort_all_requests": False})

    def flush_cache(self) -> None:
        """Drop the prefix cache (KV and routes computed with the old weights)."""
        self._call("POST", "/flush_cache", expect_json=False)

    # -- transports --------------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> None:
        """Join the trainer's broadcast group (blocks until every member joined)."""
        self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend})

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(self, names: Sequence[str], dtype: torch.dtype,
                                        shapes: Sequence[Sequence[int]], group_name: str) -> None:
        """Receive one flattened bucket by broadcast from group rank 0 and load it."""
        dtype_name = str(dtype).removeprefix("torch.")
        self._call("POST", "/update_weights_from_distributed", {
            "names": list(names), "dtypes": [dtype_name] * len(names),
            "shapes": [list(s) for s in shapes], "group_name": group_name,
            "flush_cache": False, "load_format": "flattened_bucket"})

    def update_weights_from_tensor(self, serialized: str, tp_size: int,
                                   flush_cache: bool = False) -> None:
        """Load one serialized ``[(name, tensor)]`` list (one copy per server TP rank)."""
        self._call("POST", "/update_weights_from_tensor", {
            "serialized_named_tensors": [serialized] * tp_size, "flush_cache": flush_cache})

    def update_weights_from_disk(self, model_path: str) -> None:
        """Reload every weight from an HF checkpoint directory the server can read."""
        self._call("POST", "/update_weights_from_disk", {"model_path": model_path})

    # -- inspection --------------------------------------------------------------------------
    def weight_checksums(self) -> dict[str, str]:
        """``{SGLang parameter name: hex digest}`` of the served weights (TP rank 0).

        The digest is the first 8 bytes of the SHA-256 of the tensor's raw bytes, as SGLang's
        ``/weights_checker {"action": "checksum"}`` computes it on CPU.
        """
        answer = self._call("POST", "/weights_checker", {"action": "checksum"})
        ranks = answer.get("ranks") or []
        if not ranks:
            raise WeightUpdateError(f"SGLang server {self.base_url}: /weights_checker sent no "
                                    "checksums")
        return dict(ranks[0]["checksums"])


def chunk_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                        max_bytes: int) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most ``max_bytes`` (a larger tensor travels alone)."""
    chunk, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk
