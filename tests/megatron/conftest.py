import pytest

from tests.megatron import layout_worker
from tests.multiproc import run_distributed


@pytest.fixture(scope="session")
def initial_checkpoint(tmp_path_factory):
    """``initial_checkpoint(family)``: the directory of layout_worker's seeded initial model of
    ``family``, saved once per session for every test that starts from it (read only)."""
    saved = {}

    def directory(family: str) -> str:
        if family not in saved:
            saved[family] = str(tmp_path_factory.mktemp(f"init_{family}") / "init")
            run_distributed(layout_worker.init_checkpoint, 1, family, saved[family])
        return saved[family]

    return directory
