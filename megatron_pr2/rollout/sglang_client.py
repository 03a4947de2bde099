"""SGLang rollout adapter over HTTP (``/generate`` on token ids, weight updates, health).

One request per prompt, all in flight at once by default, spread over the live servers of a
:class:`~megatron_pr2.rollout.server_pool.ServerPool` (prompt ``i`` starts at live server
``i mod n``). A server that does not answer (refused, reset, timed out) or fails a weight update
leaves the pool and its requests are retried on the others; 5xx answers are retried with
backoff, within a bounded budget; 4xx answers and malformed bodies are not retried. When some prompts still fail, :class:`PartialRolloutError` carries every sample already
collected (prompt order) and the failed prompt indices, so a caller can resubmit only those.

Every answer is checked against the wire contract (docs/platform.md): ``output_ids``
present, integer and in the vocabulary; one log-prob per output token naming the same token;
``meta_info["routed_experts"]`` decoding to exactly ``[seqlen - 1 - start_len, layers, top_k]``
with valid, non-repeating expert ids (see :mod:`megatron_pr2.rollout.route_codec`); the server's
prompt length equal to ours.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import requests
import torch

from megatron_pr2.rollout.engine import (
    EngineHealth,
    EngineUnavailableError,
    MalformedResponseError,
    PartialRolloutError,
    RolloutError,
)
from megatron_pr2.rollout.route_codec import RouteShape, decode_routed_experts
from megatron_pr2.rollout.sample import (
    Sample,
    SampleStatus,
    SamplingParams,
    sample_seed,
)
from megatron_pr2.rollout.server_pool import ServerFailure, ServerPool
from megatron_pr2.rollout.weight_version import METADATA_KEY, reported_version

logger = logging.getLogger(__name__)

_FINISH_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED}


@dataclasses.dataclass(frozen=True)
class SGLangClientConfig:
    """Transport settings.

    Attributes:
        connect_timeout: seconds to open a connection.
        request_timeout: seconds to wait for one answer.
        max_attempts: tries per request, across addresses (>= 1).
        backoff: seconds before the second try; doubled after each failure.
        max_concurrency: requests in flight at once (0: the whole batch; SGLang schedules them).
        weight_chunk_bytes: tensor bytes per ``/update_weights_from_tensor`` request.
        tp_size: the servers' tensor-parallel size (the tensor payload is sent once per rank).
        api_key: sent as ``Authorization: Bearer`` (servers started with SGLang's ``--api-key``).
        rejoin_interval: seconds between two ``/health`` probes of one evicted server (0: an
            evicted server never rejoins).
    """

    connect_timeout: float = 5.0
    request_timeout: float = 600.0
    max_attempts: int = 3
    backoff: float = 0.5
    max_concurrency: int = 0
    weight_chunk_bytes: int = 256 << 20
    tp_size: int = 1
    api_key: str | None = dataclasses.field(default=None, repr=False)
    rejoin_interval: float = 60.0

    def __post_init__(self):
        if self.max_attempts < 1 or self.tp_size < 1:
            raise ValueError("max_attempts and tp_size must be >= 1")
        if self.rejoin_interval < 0:
            raise ValueError(f"rejoin_interval must be >= 0 s (0: off), got {self.rejoin_interval}")
        if self.max_concurrency < 0:
            raise ValueError(f"max_concurrency must be >= 0 (0: all), got {self.max_concurrency}")


class _RetryableError(RolloutError):
    """A failure worth trying again on another address."""


class _ServerDownError(_RetryableError, ServerFailure):
    """The server did not answer (refused, reset, timed out): it leaves the pool."""


# ---------------------------------------------------------------------------------------------
# Pure wire helpers
# ---------------------------------------------------------------------------------------------


def build_generate_payload(prompt: Sequence[int], sampling: SamplingParams, *,
                           return_logprobs: bool, return_routed_experts: bool,
                           routed_experts_start_len: int = 0,
                           request_index: int = 0) -> dict[str, Any]:
    """The JSON body of request ``request_index`` of a batch (its seed: :func:`sample_seed`)."""
    params: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": sampling.top_p,
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.top_k:
        params["top_k"] = sampling.top_k
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.seed is not None:
        params["sampling_seed"] = sample_seed(sampling.seed, request_index)
    payload: dict[str, Any] = {
        "input_ids": [int(t) for t in prompt],
        "sampling_params": params,
        "return_logprob": return_logprobs,
    }
    if return_routed_experts:
        payload["return_routed_experts"] = True
        payload["routed_experts_start_len"] = routed_experts_start_len
    return payload


def prompt_groups(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The group of each request: runs of equal consecutive prompts (a prompt's samples) share
    one, numbered from 0; requests are placed on servers by group (one server per prompt, so
    its samples share the server's prefix cache; prompts spread over the servers)."""
    groups: list[int] = []
    for i, prompt in enumerate(prompts):
        same = i > 0 and list(prompt) == list(prompts[i - 1])
        groups.append(groups[-1] if same else (groups[-1] + 1 if groups else 0))
    return groups


def _field(body: dict, key: str, kind: type, where: str):
    if key not in body:
        raise MalformedResponseError(f"{where} has no {key!r} field")
    value = body[key]
    if not isinstance(value, kind):
        raise MalformedResponseError(f"{where}[{key!r}] must be {kind.__name__}, got {type(value).__name__}")
    return value


def _output_ids(body: dict, vocab_size: int | None) -> list[int]:
    ids = _field(body, "output_ids", list, "generate answer")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise MalformedResponseError("output_ids must be a list of integers")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise MalformedResponseError(f"output_ids has token {bad} outside [0, {vocab_size})")
    return ids


def _output_log_probs(meta: dict, output_ids: list[int]) -> torch.Tensor:
    entries = _field(meta, "output_token_logprobs", list, "meta_info")
    if len(entries) != len(output_ids):
        raise MalformedResponseError(
            f"output_token_logprobs has {len(entries)} entries for {len(output_ids)} output tokens"
        )
    values = []
    for i, (entry, token) in enumerate(zip(entries, output_ids)):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], (int, float)):
            raise MalformedResponseError(f"output_token_logprobs[{i}] must be [logprob, token_id, ...], got {entry!r}")
        if entry[1] != token:
            raise MalformedResponseError(
                f"output_token_logprobs[{i}] is for token {entry[1]}, but output_ids[{i}] = {token}"
            )
        values.append(float(entry[0]))
    return torch.tensor(values, dtype=torch.float32)


def _status(meta: dict) -> SampleStatus:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        message = reason.get("message", "") if isinstance(reason, dict) else ""
        raise _RetryableError(f"server aborted the request {message}".strip())
    if kind not in _FINISH_STATUS:
        raise MalformedResponseError(f"meta_info.finish_reason {reason!r} is not stop/length/abort")
    return _FINISH_STATUS[kind]


def parse_generate_response(body: Any, prompt: Sequence[int], route_shape: RouteShape, *,
                            vocab_size: int | None, return_logprobs: bool,
                            return_routed_experts: bool, routed_experts_start_len: int = 0) -> Sample:
    """Check one ``/generate`` answer and turn it into a :class:`Sample`.

    With ``routed_experts_start_len = s > 0`` the server sends rows ``s .. T-2`` only; they are
    kept in ``metadata["routed_experts_tail"]`` and ``routed_experts`` stays None (a Sample
    always holds all ``T-1`` rows).

    Raises:
        MalformedResponseError: naming the broken part of the contract.
    """
    if not isinstance(body, dict):
        raise MalformedResponseError(f"generate answer must be a JSON object, got {type(body).__name__}")
    output_ids = _output_ids(body, vocab_size)
    meta = _field(body, "meta_info", dict, "generate answer")
    status = _status(meta)
    if not output_ids:
        raise MalformedResponseError("output_ids is empty: the server generated nothing")
    prompt_tokens = meta.get("prompt_tokens")
    if prompt_tokens is not None and prompt_tokens != len(prompt):
        raise MalformedResponseError(
            f"server counted {prompt_tokens} prompt tokens, the request had {len(prompt)}"
        )
    tokens = torch.tensor([*prompt, *output_ids], dtype=torch.long)
    log_probs = _output_log_probs(meta, output_ids) if return_logprobs else None
    routes, metadata = None, {}
    if return_routed_experts:
        num_rows = tokens.numel() - 1 - routed_experts_start_len
        if "routed_experts" not in meta or meta["routed_experts"] is None:
            raise MalformedResponseError(
                "meta_info has no 'routed_experts' (start the server with --enable-return-routed-experts)"
            )
        decoded = decode_routed_experts(meta["routed_experts"], num_rows=num_rows, route_shape=route_shape)
        if routed_experts_start_len:
            metadata["routed_experts_tail"] = decoded
        else:
            routes = decoded
    return Sample(tokens=tokens, prompt_length=len(prompt), rollout_log_probs=log_probs,
                  routed_experts=routes, status=status, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class SGLangClient:
    """A :class:`~megatron_pr2.rollout.engine.RolloutEngine` backed by a pool of SGLang servers.

    Args:
        addresses: base URLs, e.g. ``["http://127.0.0.1:30000"]``.
        route_shape: the served model's route shape (``RouteShape.from_hf_config``).
        vocab_size: token ids must be below it (None: unchecked).
        config: transport settings.
    """

    name = "sglang"

    def __init__(self, addresses: Sequence[str], route_shape: RouteShape, *,
                 vocab_size: int | None = None, config: SGLangClientConfig | None = None):
        if not addresses:
            raise ValueError("SGLangClient needs at least one server address")
        self.addresses = [a.rstrip("/") for a in addresses]
        self.config = config or SGLangClientConfig()
        self.pool = ServerPool(self.addresses, self.config.rejoin_interval)
        self.route_shape = route_shape
        self.vocab_size = vocab_size
        self._local = threading.local()
        self.weight_version: int | None = None  # of the last completed sync (weight_version.py)

    @classmethod
    def for_hf_config(cls, addresses: Sequence[str], hf_config, **kwargs) -> SGLangClient:
        from megatron_pr2.models.hf_config import parse_hf_config

        spec = parse_hf_config(hf_config)
        return cls(addresses, RouteShape.from_hf_config(spec), vocab_size=spec.vocab_size, **kwargs)

    # -- transport ---------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self.config.api_key:
                session.headers["Authorization"] = f"Bearer {self.config.api_key}"
        return session

    def _request_once(self, address: str, method: str, path: str, body: Any = None,
                      read_timeout: float | None = None) -> Any:
        url = address + path
        timeout = (self.config.connect_timeout, read_timeout or self.config.request_timeout)
        try:
            response = self._session().request(method, url, json=body, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _ServerDownError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            raise _RetryableError(f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            hint = " (wrong or missing API key?)" if response.status_code in (401, 403) else ""
            raise RolloutError(f"{method} {url}: HTTP {response.status_code}{hint}: "
                               f"{response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            raise MalformedResponseError(f"{method} {url}: answer is not JSON: {response.text[:200]!r}") from None

    def _request(self, method: str, path: str, body: Any = None, *, first: int = 0,
                 check=None) -> tuple[Any, str]:
        """Send with retries over the live servers starting at ``first``; return (result, address).

        An unreachable or timed-out server leaves the pool; a 5xx or an aborted request is
        retried elsewhere without evicting; a malformed answer is retried elsewhere and counted
        against its server (:meth:`ServerPool.bad_answer` evicts after a few).
        """
        errors = []
        delay = self.config.backoff
        for attempt in range(self.config.max_attempts):
            address = self.pool.pick(first + attempt)
            if attempt:
                self.pool.count_retry()
            try:
                answer = self.pool.run_on(
                    address, lambda a: self._request_once(a, method, path, body))
                return (check(answer) if check else answer), address
            except MalformedResponseError as exc:  # the server's fault: try another one
                errors.append(str(exc))
                logger.warning("attempt %d/%d: malformed answer: %s", attempt + 1,
                               self.config.max_attempts, exc)
                self.pool.bad_answer(address, str(exc))
                if not any(other != address for other in self.pool.live):
                    raise  # no other server to ask
            except _RetryableError as exc:
                errors.append(str(exc))
                logger.warning("attempt %d/%d failed: %s", attempt + 1, self.config.max_attempts, exc)
                if attempt + 1 < self.config.max_attempts and not isinstance(exc, _ServerDownError):
                    time.sleep(delay)
                    delay *= 2
        raise EngineUnavailableError(
            f"{method} {path} failed after {self.config.max_attempts} attempts: " + " | ".join(errors)
        )

    # -- RolloutEngine -----------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 return_logprobs: bool = True, return_routed_experts: bool = True,
                 on_sample: Callable[[int, Sample], None] | None = None) -> list[Sample]:
        """Generate one continuation per prompt (prompt order kept).

        Every request is in flight at once (``config.max_concurrency`` caps it), spread over the
        live servers by prompt (:func:`prompt_groups`), which schedule them; request ``i`` samples
        with seed ``sample_seed(sampling.seed, i)``; each answer is parsed and its routes decoded as it
        arrives, then handed to ``on_sample(index, sample)`` in the worker thread, while the
        other requests are still generating.

        Raises:
            PartialRolloutError: some prompts failed; ``samples`` keeps the collected ones.
        """
        prompts = [list(map(int, p)) for p in prompts]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
        results: list[Sample | None] = [None] * len(prompts)
        failures: dict[int, str] = {}
        cap = self.config.max_concurrency or len(prompts)
        workers = max(1, min(cap, len(prompts)))
        groups = prompt_groups(prompts)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sglang") as pool:
            futures = {
                pool.submit(self._generate_one, i, groups[i], prompt, sampling, return_logprobs,
                            return_routed_experts, on_sample): i
                for i, prompt in enumerate(prompts)
            }
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                try:
                    results[index] = future.result()
                except RolloutError as exc:
                    failures[index] = f"{type(exc).__name__}: {exc}"
        if failures:
            first = min(failures)
            raise PartialRolloutError(
                f"{len(failures)} of {len(prompts)} prompts failed (kept {len(prompts) - len(failures)} "
                f"samples); prompt {first}: {failures[first]}",
                results, sorted(failures),
            )
        return results

    def _generate_one(self, index: int, group: int, prompt: list[int], sampling: SamplingParams,
                      return_logprobs: bool, return_routed_experts: bool,
                      on_sample: Callable[[int, Sample], None] | None) -> Sample:
        payload = build_generate_payload(prompt, sampling, return_logprobs=return_logprobs,
                                         return_routed_experts=return_routed_experts,
                                         request_index=index)

        def check(body):
            sample = parse_generate_response(
                body, prompt, self.route_shape, vocab_size=self.vocab_size,
                return_logprobs=return_logprobs, return_routed_experts=return_routed_experts)
            sample.metadata[METADATA_KEY] = reported_version(
                body["meta_info"].get("weight_version"), self.weight_version, "the server")
            return sample

        sample, address = self._request("POST", "/generate", payload, first=group, check=check)
        sample.metadata.update(engine=address, finished_at=time.monotonic())
        if on_sample is not None:
            on_sample(index, sample)
        return sample

    def metrics(self) -> dict[str, float]:
        """The server pool's size and counters (evictions, rejoins, retried requests)."""
        return self.pool.metrics()

    # -- weights -------------------------------------------------------------------------------

    def on_each_server(self, operation: Callable[[str], None]) -> None:
        """Run a weight operation on every live server, and on :meth:`rejoin_candidates`.

        A server whose operation raises leaves the pool (the run goes on with the others); a
        candidate on which the operation succeeds rejoins it, so ``operation`` must be a full
        weight sync.

        Raises:
            NoServerLeftError: no server is left after the operation.
        """
        comeback = self.rejoin_candidates()
        for address in self.pool.live + comeback:
            try:
                self.pool.run_on(address, lambda a: self._as_server_failure(operation, a))
            except ServerFailure as exc:
                if address in comeback:
                    self.pool.rejoin_failed([address], str(exc))
                continue
            if address in comeback:
                self.pool.rejoin(address)
        self.pool.require_live()

    @staticmethod
    def _as_server_failure(operation: Callable[[str], None], address: str) -> None:
        try:
            operation(address)
        except RolloutError as exc:
            raise ServerFailure(f"weight update failed: {exc}") from None

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push HF-named tensors to every live server (``/update_weights_from_tensor``, chunked
        inside one update session per server; the prefix cache is flushed with the last chunk).

        A server that fails leaves the pool; an evicted one that succeeds rejoins it
        (:meth:`on_each_server`).
        """
        from megatron_pr2.rollout.sglang_weight_api import (
            chunk_named_tensors,
            serialize_named_tensors,
        )

        blobs = [serialize_named_tensors(c)
                 for c in chunk_named_tensors(named_tensors, self.config.weight_chunk_bytes)]

        def push(address: str) -> None:
            api = self._weight_api(address)
            api.begin_weight_update()
            try:
                for i, blob in enumerate(blobs):
                    api.update_weights_from_tensor(blob, self.config.tp_size,
                                                   flush_cache=i == len(blobs) - 1)
            finally:
                api.end_weight_update()

        self.on_each_server(push)
        logger.info("pushed weights in %d chunks to %d servers", len(blobs), len(self.pool.live))

    def set_weight_version(self, version: int) -> None:
        """Tag every live server's weights with ``version`` (the sync that just completed); a
        server that does not take it leaves the pool, as on a failed weight update."""
        def tag(address: str) -> None:
            self._weight_api(address).update_weight_version(version)

        for address in self.pool.live:
            try:
                self.pool.run_on(address, functools.partial(self._as_server_failure, tag))
            except ServerFailure:
                continue
        self.pool.require_live()
        self.weight_version = version

    def update_weights_from_disk(self, model_path: str) -> None:
        """Make every server reload its weights from an HF checkpoint directory it can read."""
        self.on_each_server(lambda a: self._weight_api(a).update_weights_from_disk(model_path))

    def _weight_api(self, address: str):
        """The weight-update endpoints of one server (:mod:`megatron_pr2.weight_sync`)."""
        from megatron_pr2.rollout.sglang_weight_api import SGLangWeightAPI

        return SGLangWeightAPI(address, self.api_key, self.config.request_timeout)

    @property
    def api_key(self) -> str | None:
        """The servers' API key (weight sync sends it to every server)."""
        return self.config.api_key

    # -- health --------------------------------------------------------------------------------

    def rejoin_candidates(self) -> list[str]:
        """Evicted servers due for a probe (:meth:`ServerPool.probe_due`) that answer ``/health``.

        The probes run concurrently, each bounded by ``connect_timeout`` + 10 s. A candidate
        holds stale weights: it rejoins (:meth:`ServerPool.rejoin`) only after a full weight
        sync to it succeeded, else the caller reports :meth:`ServerPool.rejoin_failed`.
        """
        due = self.pool.probe_due()
        if not due:
            return []
        with concurrent.futures.ThreadPoolExecutor(len(due), thread_name_prefix="probe") as pool:
            healthy = list(pool.map(self._answers_health, due))
        candidates = [a for a, ok in zip(due, healthy) if ok]
        if candidates:
            logger.info("evicted SGLang server(s) answer /health again: %s", ", ".join(candidates))
        return candidates

    def _answers_health(self, address: str) -> bool:
        try:
            timeout = (self.config.connect_timeout, 10.0)
            return self._session().get(address + "/health", timeout=timeout).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def health(self, deep: bool = False) -> EngineHealth:
        """Ask each server's ``/health`` (``deep``: ``/health_generate``, which runs a generation).

        A live server that fails the check leaves the pool; an evicted one stays out until a
        full weight sync to it succeeded (:meth:`rejoin_candidates`).
        """
        path = "/health_generate" if deep else "/health"
        healthy, detail = {}, {}
        for address in self.addresses:
            try:
                timeout = (self.config.connect_timeout, self.config.request_timeout if deep else 10.0)
                response = self._session().get(address + path, timeout=timeout)
                healthy[address] = response.status_code == 200
                detail[address] = f"HTTP {response.status_code}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                healthy[address] = False
                detail[address] = f"{type(exc).__name__}: {exc}"
            if not healthy[address]:
                self.pool.evict(address, f"health check {path}: {detail[address]}")
        for address, reason in self.pool.evicted.items():
            if healthy.get(address):
                healthy[address] = False
                detail[address] = f"evicted until the next full weight sync ({reason})"
        return EngineHealth(healthy, detail)
