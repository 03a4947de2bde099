"""The trainer's side of SGLang's weight-update process group (rank 0 of trainer + servers).

SGLang's servers join with ``init_custom_process_group``: a TCP rendezvous, a
``PrefixStore(group_name)`` and torch's process-group factory. The trainer must build its side
the same way so that both ends use the same store keys; this module is the one place that does
it (torch has no public constructor for a group outside the default world).
"""

from __future__ import annotations

import datetime

import torch.distributed as dist


def create_update_group(backend: str, master_address: str, master_port: int, world_size: int,
                        group_name: str, timeout_s: float) -> dist.ProcessGroup:
    """Rendezvous as rank 0 and return the group (blocks until every server rank joined).

    Args:
        backend: ``nccl`` (GPU trainer and servers) or ``gloo`` (CPU).
        master_address, master_port: where this process hosts the rendezvous store.
        world_size: 1 + the servers' ranks.
        group_name: unique per group (SGLang blocks on a reused name).
        timeout_s: bound on the rendezvous and on every collective of the group.
    """
    from torch.distributed.distributed_c10d import (
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    init_method = f"tcp://{master_address}:{master_port}"
    store, rank, world_size = next(rendezvous(init_method, 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], backend,
                                         PrefixStore(group_name, store), group_name=group_name,
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_update_group(group: dist.ProcessGroup | None) -> None:
    """Release the trainer's side (after a failure the servers' side is destroyed by HTTP)."""
    if group is not None:
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError, KeyError):
            pass
