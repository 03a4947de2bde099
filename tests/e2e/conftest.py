import pytest

from tests.e2e.test_train_methods import _run


@pytest.fixture(scope="session")
def method_records(tmp_path_factory):
    """``method_records(method)``: the metrics of the 2-iteration run of ``method`` with
    tests/e2e/test_train_methods.py's settings, trained once per session whatever reads it."""
    runs = {}

    def records(method: str) -> list[dict]:
        if method not in runs:
            runs[method] = _run(method, tmp_path_factory.mktemp(method))
        return runs[method]

    return records
