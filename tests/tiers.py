"""The test tiers, in one place: which tests are slow, distributed, SGLang or GPU tests.

``pytest -m "not slow"`` is the fast tier (every module's logic, <= 5 minutes on 2 cores);
``pytest tests`` runs everything. A test gets the markers of every entry below whose path (a
directory or file under the repository root, or a test id) its id starts with; a test may also
carry ``@pytest.mark.slow`` (or another of the markers in pytest.ini) itself.
"""

from __future__ import annotations

import os

import pytest

SLOW, DISTRIBUTED, SGLANG, GPU = "slow", "distributed", "sglang", "gpu"

TIERS: dict[str, tuple[str, ...]] = {
    # the GPU smoke suite (skipped without CUDA)
    "tests/gpu/": (GPU, SLOW),
    "tests/gpu/test_sglang_gpu.py": (GPU, SGLANG, SLOW),
    # whole trainer runs, the compare job, recipe scripts, fresh interpreters
    "tests/e2e/": (SLOW,),
    # a real SGLang server
    "tests/integration/test_sglang_pool.py": (SGLANG, SLOW),
    "tests/integration/test_sglang_server.py": (SGLANG, SLOW),
    "tests/integration/test_weight_sync_sglang.py": (SGLANG, DISTRIBUTED, SLOW),
    # two gloo processes
    "tests/integration/test_rollout_distributed.py": (DISTRIBUTED, SLOW),
    "tests/integration/test_rollout_r3_megatron.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_convert_parallel.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_distopt_resume.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_engine_weight_sync_parallel.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_lookahead_distopt.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_lookahead_parallel.py::test_lookahead_routes_equal_one_process":
        (DISTRIBUTED, SLOW),
    "tests/megatron/test_optimizer_layouts.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_overlap_grad_reduce.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_parallel_layouts.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_router_parallel.py": (DISTRIBUTED, SLOW),
    "tests/megatron/test_weight_sync_layouts.py": (DISTRIBUTED, SLOW),
    "tests/unit/test_rollout_source.py::test_each_data_parallel_rank_receives_only_its_own_routes":
        (DISTRIBUTED, SLOW),
}
"""Path or test-id prefix -> markers."""

FAST_TIER_EXCEPTIONS: tuple[str, ...] = (
    # one tiny training run in a fresh interpreter: the whole trainer, end to end, in the fast tier
    "tests/e2e/test_quiet_start.py",
)
"""Tests under a slow path that stay in the fast tier."""


def check_tier_table(root: str) -> None:
    """Every entry names a file or directory that exists (a renamed test must not silently
    leave its tier)."""
    stale = [path for path in [*TIERS, *FAST_TIER_EXCEPTIONS]
             if not os.path.exists(os.path.join(root, path.split("::")[0]))]
    if stale:
        raise pytest.UsageError(f"tests/tiers.py names paths that do not exist: {stale}")


def markers_for(node_id: str) -> set[str]:
    """The tier markers of a test, by its id (``tests/unit/test_x.py::test_y[param]``)."""
    if node_id.startswith(FAST_TIER_EXCEPTIONS):
        return set()
    return {marker for path, markers in TIERS.items() if node_id.startswith(path)
            for marker in markers}


def assign_tiers(items) -> None:
    """Add each collected test's tier markers (its own ``@pytest.mark`` markers stay)."""
    for item in items:
        for marker in sorted(markers_for(item.nodeid)):
            item.add_marker(marker)
