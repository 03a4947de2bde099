"""Choose and build the weight-sync transport for a rollout engine (``--weight-sync``)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from megatron_pr2.rollout.sglang_weight_api import SGLangWeightAPI, WeightUpdateError
from megatron_pr2.weight_sync.syncer import WeightSyncer, agree_on_error
from megatron_pr2.weight_sync.transports import (
    DiskTransport,
    InProcessTransport,
    SGLangDistributedTransport,
    SGLangTensorTransport,
    Transport,
    server_tp_sizes,
)

logger = logging.getLogger(__name__)

ADDRESS_ENV = "MEGATRON_PR2_WEIGHT_SYNC_ADDR"  # per node: this node as the SGLang servers reach it
TRANSPORTS = {"inprocess": ("tensor", "disk"), "sglang": ("distributed", "tensor", "disk")}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


@dataclasses.dataclass
class WeightSyncOptions:
    """How weights reach the engine.

    Attributes:
        transport: ``tensor`` | ``distributed`` | ``disk`` (None: ``tensor`` for the in-process
            engine, ``distributed`` for SGLang).
        bucket_bytes: maximum bucket size.
        dtype: ``bf16`` | ``fp32`` | ``fp16`` (None: the engine's own dtype).
        directory: the disk transport's directory (readable by every engine host).
        master_address: address SGLang servers reach the pushing ranks at, one for all nodes
            (see :func:`master_address`; ``$MEGATRON_PR2_WEIGHT_SYNC_ADDR`` overrides it per node).
        timeout_s: bound on a group rendezvous and on one bucket's broadcast.
    """

    transport: str | None = None
    bucket_bytes: int = 512 << 20
    dtype: str | None = None
    directory: str | None = None
    master_address: str | None = None
    timeout_s: float = 600.0

    @classmethod
    def from_run_config(cls, cfg) -> WeightSyncOptions:
        """The ``--weight-sync*`` flags of a run config (disk under ``--save``)."""
        rollout = cfg.rollout
        return cls(transport=rollout.weight_sync, bucket_bytes=rollout.weight_sync_bucket_mb << 20,
                   dtype=rollout.weight_sync_dtype,
                   directory=(os.path.join(cfg.train.save, "weight_sync_hf")
                              if cfg.train.save else None),
                   master_address=rollout.weight_sync_master_addr,
                   timeout_s=max(60.0, rollout.rollout_timeout))


def engine_kind(engine) -> str:
    return "sglang" if getattr(engine, "name", "") == "sglang" else "inprocess"


def resolve_transport(engine, requested: str | None) -> str:
    kind = engine_kind(engine)
    name = requested or TRANSPORTS[kind][0]
    if name not in TRANSPORTS[kind]:
        raise ValueError(f"--weight-sync {name} is not available for the {kind} engine; choose "
                         f"one of {', '.join(TRANSPORTS[kind])}")
    return name


@dataclasses.dataclass(frozen=True)
class ServerView:
    """What every pushing rank needs of rank 0's SGLang client: the live servers and the key."""

    addresses: tuple[str, ...]
    api_key: str | None
    request_timeout: float
    name: str = "sglang"


def _server_view(engine, rejoining: Sequence[str] = ()) -> ServerView | None:
    """Rank 0's SGLang servers (the live ones and the evicted ones in ``rejoining``), shared
    with every rank over the host group; None for the in-process engine. Only rank 0 holds the
    engine; a bad ``rejoining`` raises the same error on every rank."""
    from megatron_pr2.platform.distributed import host_group
    from megatron_pr2.rollout.exchange import broadcast_object

    view, error = None, None
    if dist.get_rank() == 0:
        try:
            view = _rank0_view(engine, rejoining)
        except ValueError as exc:
            error = str(exc)
    view, error = broadcast_object((view, error), group=host_group())
    if error:
        raise ValueError(error)
    return view


def _rank0_view(engine, rejoining: Sequence[str]) -> ServerView | None:
    if engine_kind(engine) != "sglang":
        if rejoining:
            raise ValueError(f"servers to rejoin {list(rejoining)} need an SGLang engine")
        return None
    pool = getattr(engine, "pool", None)
    if pool is None:
        if rejoining:
            raise ValueError(f"servers to rejoin {list(rejoining)} need an engine with a pool")
        addresses = tuple(engine.addresses)
    else:
        evicted = pool.evicted
        unknown = [a for a in rejoining if a not in evicted]
        if unknown:
            raise ValueError(f"servers to rejoin must be evicted servers of the pool; not "
                             f"evicted: {unknown}")
        live = set(pool.live) | set(rejoining)
        addresses = tuple(a for a in engine.addresses if a in live)
    return ServerView(addresses, getattr(engine, "api_key", None),
                      float(getattr(engine.config, "request_timeout", 600.0)))


def _apis(servers: ServerView) -> list[SGLangWeightAPI]:
    return [SGLangWeightAPI(address, servers.api_key, servers.request_timeout)
            for address in servers.addresses]


def engine_dtype(engine, apis, hf_config: dict) -> torch.dtype:
    """The dtype the engine holds its weights in."""
    if engine_kind(engine) == "inprocess":
        return engine.dtype
    names = {str(api.server_info().get("dtype", "auto")) for api in apis}
    if len(names) != 1:
        raise WeightUpdateError(f"SGLang servers disagree on their dtype: {sorted(names)}")
    name = names.pop()
    if name == "auto":
        name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16")
    if name not in DTYPES:
        raise WeightUpdateError(f"SGLang serves dtype {name!r}, which the weight sync cannot send")
    return DTYPES[name]


def _loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def routable_address(url: str) -> str:
    """This host's address on the interface that routes to ``url``'s host (a UDP ``connect``
    only picks the route; nothing is sent). Unlike ``gethostbyname(gethostname())``, never the
    127.0.1.1 that stock Ubuntu maps the host name to."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((parsed.hostname, parsed.port or 80))
        except OSError as exc:
            raise ValueError(f"no route from this host to the SGLang server {url}: {exc}; set "
                             f"{ADDRESS_ENV} to this node's address as the servers reach it"
                             ) from None
        return probe.getsockname()[0]


def master_address(engine, requested: str | None) -> str:
    """The address the servers reach this pushing rank at: ``$MEGATRON_PR2_WEIGHT_SYNC_ADDR``
    (set per node), else ``--weight-sync-master-addr``, else loopback when every server is on
    loopback, else this host's address on the route to the first server."""
    per_node = os.environ.get(ADDRESS_ENV)
    if per_node:
        return per_node
    if requested:
        return requested
    if all(_loopback(a) for a in engine.addresses):
        return "127.0.0.1"
    return routable_address(engine.addresses[0])


def _disk_directory(requested: str | None) -> str:
    return requested or os.path.join(tempfile.gettempdir(), "megatron_pr2_weight_sync")


def build_transport(name: str, engine, hf_config: dict, options: WeightSyncOptions, stage: int,
                    apis, host_group) -> Transport:
    if name == "disk":
        if engine_kind(engine) == "inprocess":
            reload = engine.update_weights_from_disk
        else:
            def reload(path):
                for api in apis:
                    api.update_weights_from_disk(path)
        return DiskTransport(_disk_directory(options.directory), hf_config, reload, stage)
    if engine_kind(engine) == "inprocess":
        return InProcessTransport(engine, host_group)
    for api in apis:
        api.require_update_session()
    sizes = server_tp_sizes(apis)
    if name == "tensor":
        return SGLangTensorTransport(apis, sizes)
    backend = "nccl" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "gloo"
    return SGLangDistributedTransport(apis, sizes, backend,
                                      master_address(engine, options.master_address), stage,
                                      options.timeout_s)


def build_weight_syncer(model_chunks, engine, hf_config: dict,
                        options: WeightSyncOptions | None = None, groups=None,
                        rejoining: Sequence[str] = ()) -> WeightSyncer:
    """The weight syncer of this rank for ``engine`` (call on every rank; ``groups``: the run's
    ``ProcessGroupCollection``, default Megatron's initialised groups).

    An SGLang engine's syncer targets its live servers plus ``rejoining`` (rank 0's list:
    evicted servers of its pool that are to receive a full sync before they rejoin)."""
    from megatron_pr2.platform.distributed import host_group, process_groups
    from megatron_pr2.rollout.exchange import broadcast_object
    from megatron_pr2.weight_sync.gather import StagePosition

    options = options or WeightSyncOptions()
    servers = _server_view(engine, rejoining)
    if servers is not None and engine is None:
        engine = servers  # ranks other than 0 push to rank 0's servers
    name = resolve_transport(engine, options.transport)
    groups = process_groups(groups)
    position = StagePosition.of(groups)
    talks = position.is_pusher or dist.get_rank() == 0
    apis = _apis(servers) if servers is not None and talks else []
    error, dtype = None, None
    try:
        dtype = DTYPES[options.dtype] if options.dtype else (
            engine_dtype(engine, apis, hf_config) if dist.get_rank() == 0 else None)
    except (KeyError, WeightUpdateError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    error, dtype = broadcast_object((error, dtype), group=host_group())
    if error:
        raise WeightUpdateError(f"the weight sync set-up failed: rank 0: {error}")
    transport, error = Transport(), None
    if talks:
        try:
            transport = build_transport(name, engine, hf_config, options, position.stage, apis,
                                        host_group())
        except (WeightUpdateError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    agree_on_error(host_group(), error, "the weight sync set-up", WeightUpdateError)
    return WeightSyncer(model_chunks, hf_config, transport, dtype, options.bucket_bytes,
                        groups)
