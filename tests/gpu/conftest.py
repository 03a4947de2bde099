"""GPU smoke suite: collected everywhere, run only where CUDA is available.

Run it with ``bash tools/gpu_smoke.sh`` (see README, "GPU smoke suite").
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU smoke suite: CUDA is not available")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
