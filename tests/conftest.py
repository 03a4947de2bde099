import logging

import pytest


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron parallel state for one CPU process (gloo), shared by in-process tests."""
    from megatron_pr2.platform import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig())
    yield
    logging.getLogger(__name__).debug("single-process Megatron state left for interpreter exit")
