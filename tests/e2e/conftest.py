import traceback

import pytest

from tests.e2e.test_train_methods import METHODS, _train_worker
from tests.multiproc import run_distributed


def _train_each(rank, methods, out_dir):
    """Train every method in turn in this one process (each run tears Megatron's state down;
    a later run's metrics equal a fresh process's). A failure is returned as its traceback."""
    results = {}
    for method in methods:
        try:
            results[method] = _train_worker(rank, method, {}, f"{out_dir}/{method}")
        except Exception:  # noqa: BLE001 - reported by the test that reads this method
            results[method] = traceback.format_exc()
    return results


@pytest.fixture(scope="session")
def method_records(tmp_path_factory):
    """``method_records(method)``: the metrics of the 2-iteration run of ``method`` with
    tests/e2e/test_train_methods.py's settings. Every method of ``METHODS`` is trained once per
    session, all in one spawned process, whatever test reads it."""
    runs = run_distributed(_train_each, 1, METHODS, str(tmp_path_factory.mktemp("methods")))[0]

    def records(method: str) -> list[dict]:
        if isinstance(runs[method], str):
            pytest.fail(f"the {method} run failed:\n{runs[method]}")
        return runs[method]

    return records
