import logging

import pytest
import torch

from tests.tiers import assign_tiers, check_tier_table

# The test models are tiny: one thread avoids oversubscribing the 2-core CI machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier (tests/tiers.py)."""
    check_tier_table(str(config.rootpath))
    assign_tiers(items)


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron parallel state for one CPU process (gloo), shared by in-process tests."""
    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig())
    yield
    logging.getLogger(__name__).debug("single-process Megatron state left for interpreter exit")
