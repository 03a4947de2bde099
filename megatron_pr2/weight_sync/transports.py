"""Where a bucket goes: the in-process engine, SGLang by broadcast, SGLang by tensor, or disk.

Every transport has the same life cycle within one sync (driven by
:class:`~megatron_pr2.weight_sync.syncer.WeightSyncer`):

* ``open()`` on rank 0 before any bucket moves (e.g. open SGLang's update session);
* ``push(bucket)`` on each pipeline stage's pushing rank, bucket by bucket;
* ``end_stage()`` on each pushing rank after its last bucket, ``receive()`` on rank 0 after its
  own stage (only the in-process engine moves buckets between trainer ranks);
* ``close(manifests, ok)`` on rank 0 at the end, with every pushing rank's ``manifest()``;
* ``reset()`` on a pushing rank whose push failed (the next sync starts afresh);
* ``release()`` when the syncer is dropped (``reset()`` and the transport's threads).

``stages_in_turn``: the pipeline stages push one after another (the transports whose stages
share one set of servers), not at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_pr2.convert.safetensors_io import SafetensorsStreamWriter
from megatron_pr2.platform.device import compute_device
from megatron_pr2.platform.distributed import free_port
from megatron_pr2.rollout.sglang_weight_api import (
    SGLangWeightAPI,
    WeightUpdateError,
    serialize_named_tensors,
)
from megatron_pr2.weight_sync.bucket import FlatBucket
from megatron_pr2.weight_sync.update_group import (
    create_update_group,
    destroy_update_group,
)

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


class Transport:
    """No-op defaults of the life cycle (see the module docstring)."""

    name = "base"
    device: torch.device = torch.device("cpu")
    stages_in_turn = False

    def open(self) -> None:
        pass

    def push(self, bucket: FlatBucket) -> None:
        raise NotImplementedError

    def end_stage(self) -> None:
        pass

    def receive(self, leaders: Sequence[int]) -> None:
        pass

    def manifest(self):
        return None

    def close(self, manifests: Sequence, ok: bool) -> None:
        pass

    def reset(self) -> None:
        pass

    def release(self) -> None:
        self.reset()


def _on_every_server(apis: Sequence[SGLangWeightAPI], call: Callable[[SGLangWeightAPI], None],
                     pool: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
    """Run ``call`` against every server concurrently; raise the first failure (all finish)."""
    own = pool is None
    pool = pool or concurrent.futures.ThreadPoolExecutor(max(1, len(apis)))
    try:
        futures = [pool.submit(call, api) for api in apis]
        errors = [f.exception() for f in futures]
    finally:
        if own:
            pool.shutdown(wait=True)
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]


# --------------------------------------------------------------------------------- in-process
class InProcessTransport(Transport):
    """Buckets into the in-process ``transformers`` engine held by rank 0.

    Other pipeline stages' pushing ranks send their buckets to rank 0 over the gloo host group.
    """

    name = "inprocess"

    def __init__(self, engine, host_group):
        self.engine = engine
        self.group = host_group

    def push(self, bucket: FlatBucket) -> None:
        if dist.get_rank() == 0:
            self.engine.update_weights(bucket.named_tensors())
            return
        header = [(bucket.names, bucket.shapes, bucket.dtype, bucket.used)]
        dist.send_object_list(header, dst=0, group=self.group)
        dist.send(bucket.flat, dst=0, group=self.group)

    def end_stage(self) -> None:
        if dist.get_rank() != 0:
            dist.send_object_list([None], dst=0, group=self.group)

    def receive(self, leaders: Sequence[int]) -> None:
        """Load every other stage's buckets; drains them all even after a failed load."""
        failure = None
        for leader in leaders:
            if leader == 0:
                continue
            while True:
                header = [None]
                dist.recv_object_list(header, src=leader, group=self.group)
                if header[0] is None:
                    break
                names, shapes, dtype, used = header[0]
                bucket = FlatBucket(used, dtype)
                dist.recv(bucket.buffer, src=leader, group=self.group)
                bucket.names, bucket.shapes, bucket.used = list(names), list(shapes), used
                if failure is None:
                    try:
                        self.engine.update_weights(bucket.named_tensors())
                    except Exception as exc:  # noqa: BLE001 (re-raised after the drain)
                        failure = exc
        if failure is not None:
            raise failure


# --------------------------------------------------------------------------------- SGLang base
class _SGLangSession(Transport):
    """Opens SGLang's update session on rank 0 and closes it (then flushes the prefix cache).

    Every stage pushes to the same servers, so the stages push in turn (one pusher at a time).
    """

    stages_in_turn = True

    def __init__(self, apis: Sequence[SGLangWeightAPI]):
        self.apis = list(apis)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, len(self.apis)))

    def open(self) -> None:
        """Begin the update on every server; if any refuses, end it again where it began (a
        session left open blocks the next sync on that server)."""
        opened = []

        def begin(api: SGLangWeightAPI) -> None:
            api.begin_weight_update()
            opened.append(api)

        try:
            _on_every_server(self.apis, begin, self._pool)
        except Exception:
            for api in opened:
                try:
                    api.end_weight_update()
                except WeightUpdateError as exc:
                    logger.warning("could not end the update session on %s: %s",
                                   api.base_url, exc)
            raise

    def close(self, manifests: Sequence, ok: bool) -> None:
        _on_every_server(self.apis, lambda api: api.end_weight_update(), self._pool)
        if ok:
            _on_every_server(self.apis, lambda api: api.flush_cache(), self._pool)

    def release(self) -> None:
        self.reset()
        self._pool.shutdown(wait=False, cancel_futures=True)


def server_tp_sizes(apis: Sequence[SGLangWeightAPI]) -> list[int]:
    """Each server's tensor-parallel size (its ranks in an update group)."""
    sizes = []
    for api in apis:
        info = api.server_info()
        if int(info.get("pp_size", 1) or 1) != 1:
            raise WeightUpdateError(f"SGLang server {api.base_url}: pipeline-parallel servers "
                                    "are not supported by the weight sync")
        sizes.append(int(info.get("tp_size", 1) or 1))
    return sizes


class SGLangTensorTransport(_SGLangSession):
    """``/update_weights_from_tensor``: CUDA IPC handles for servers on the same host and GPUs;
    pickled host tensors on CPU."""

    name = "tensor"

    def __init__(self, apis: Sequence[SGLangWeightAPI], tp_sizes: Sequence[int]):
        super().__init__(apis)
        self.tp_sizes = list(tp_sizes)
        self.device = compute_device()

    def push(self, bucket: FlatBucket) -> None:
        blob = serialize_named_tensors(bucket.named_tensors())
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the IPC reader sees finished copies
        sizes = dict(zip((api.base_url for api in self.apis), self.tp_sizes))
        _on_every_server(self.apis, lambda api: api.update_weights_from_tensor(
            blob, sizes[api.base_url]), self._pool)


class SGLangDistributedTransport(_SGLangSession):
    """``/update_weights_from_distributed``: one broadcast group per pipeline stage (this stage's
    pushing rank = group rank 0, every server rank after it); one flattened bucket per call.

    Args:
        apis: the servers.
        tp_sizes: their tensor-parallel sizes.
        backend: ``nccl`` on GPUs, ``gloo`` on CPU.
        master_address: this rank's address as the servers can reach it.
        stage: pipeline stage (names the group).
        timeout_s: bound on the rendezvous and on each broadcast.
    """

    name = "distributed"

    def __init__(self, apis: Sequence[SGLangWeightAPI], tp_sizes: Sequence[int], backend: str,
                 master_address: str, stage: int, timeout_s: float = 600.0):
        super().__init__(apis)
        self.tp_sizes = list(tp_sizes)
        self.backend = backend
        self.master_address = master_address
        self.stage = stage
        self.timeout_s = timeout_s
        self.device = compute_device() if backend == "nccl" else torch.device("cpu")
        self.group = None
        self.group_name = None

    def _ensure_group(self) -> None:
        if self.group is not None:
            return
        name = f"megatron_pr2_pp{self.stage}_{uuid.uuid4().hex[:8]}"
        port = free_port("")  # the servers connect from other hosts
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.apis))]
        futures = [self._pool.submit(api.init_weights_update_group, self.master_address, port,
                                     offset, world, name, self.backend)
                   for api, offset in zip(self.apis, offsets)]
        try:
            group = create_update_group(self.backend, self.master_address, port, world, name,
                                        self.timeout_s)
        except Exception as exc:
            raise WeightUpdateError(f"stage {self.stage}: the servers did not join update group "
                                    f"{name} at {self.master_address}:{port}: {exc}") from exc
        for future in futures:
            future.result()
        self.group, self.group_name = group, name
        logger.info("weight-update group %s: %d server(s), world %d, %s", name, len(self.apis),
                    world, self.backend)

    def push(self, bucket: FlatBucket) -> None:
        self._ensure_group()
        futures = [self._pool.submit(api.update_weights_from_distributed, bucket.names,
                                     bucket.dtype, bucket.shapes, self.group_name)
                   for api in self.apis]
        work = dist.broadcast(bucket.flat, src=0, group=self.group, async_op=True)
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:  # that server will not receive: the broadcast would hang
                raise failed[0].exception()
            if time.monotonic() > deadline:
                raise WeightUpdateError(f"stage {self.stage}: broadcast of {len(bucket)} tensors "
                                        f"did not finish within {self.timeout_s:.0f} s")
            time.sleep(0.001)
        work.wait()
        for future in futures:
            future.result()

    def reset(self) -> None:
        """Drop the group on both sides; the next push builds a new one under a new name."""
        group, name = self.group, self.group_name
        self.group = self.group_name = None
        if name is not None:  # first the servers: closing their side ends a pending broadcast
            for api in self.apis:
                try:
                    api.destroy_weights_update_group(name)
                except WeightUpdateError as exc:
                    logger.warning("could not destroy %s on %s: %s", name, api.base_url, exc)
        if group is not None:  # gloo cannot abort a pending broadcast: do not wait for it here
            threading.Thread(target=destroy_update_group, args=(group,), daemon=True).start()


# --------------------------------------------------------------------------------- disk
class DiskTransport(Transport):
    """Each pushing rank writes its buckets as safetensors files into ``directory``; rank 0
    writes the index and ``config.json`` and has the engine reload the directory.

    Args:
        directory: readable by every engine host (a shared file system for remote servers).
        hf_config: written as ``config.json`` (with the pushed dtype).
        reload: ``reload(directory)`` makes the engine(s) load it.
        stage: pipeline stage of this rank (names its files).
    """

    name = "disk"

    def __init__(self, directory: str, hf_config: dict, reload: Callable[[str], None],
                 stage: int):
        self.directory = directory
        self.hf_config = dict(hf_config)
        self.reload = reload
        self.stage = stage
        self._files: dict[str, str] = {}
        self._count = 0
        self._dtype = None

    def open(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory)

    def push(self, bucket: FlatBucket) -> None:
        file = f"model-pp{self.stage:03d}-{self._count:05d}.safetensors"
        self._count += 1
        entries = [(n, s, bucket.dtype) for n, s in zip(bucket.names, bucket.shapes)]
        writer = SafetensorsStreamWriter(os.path.join(self.directory, file), entries,
                                         {"format": "pt"})
        for name, tensor in bucket.named_tensors():
            writer.write(name, tensor)
        writer.close()
        self._files.update({name: file for name in bucket.names})
        self._dtype = bucket.dtype

    def manifest(self):
        files, dtype = self._files, self._dtype
        self._files, self._count = {}, 0
        return {"weight_map": files, "dtype": None if dtype is None else str(dtype)}

    def close(self, manifests: Sequence, ok: bool) -> None:
        if not ok:
            return
        weight_map = {}
        dtypes = set()
        for entry in manifests:
            if entry:
                weight_map.update(entry["weight_map"])
                if entry["dtype"]:
                    dtypes.add(entry["dtype"].removeprefix("torch."))
        with open(os.path.join(self.directory, INDEX_NAME), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, handle)
        config = dict(self.hf_config)
        if len(dtypes) == 1:
            config["torch_dtype"] = next(iter(dtypes))
        with open(os.path.join(self.directory, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        self.reload(self.directory)
