"""JSONL/parquet prompt datasets and math-verify rewards."""

import importlib.util
import json

import pytest

from megatron_pr2.tasks import MathDataset, Problem, load_problems, math_reward

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 1+1?", "answer": "2"},
        {"prompt": [{"role": "user", "content": "Half of 1?"}], "answer": 0.5, "extra": 1}])
    got = load_problems(path)
    assert got == [Problem("What is 1+1?", "2", "math"),
                   Problem([{"role": "user", "content": "Half of 1?"}], "0.5", "math")]


def test_load_jsonl_nested_keys(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl",
                        [{"q": "x?", "reward_model": {"ground_truth": "\\frac{1}{2}"}}])
    got = load_problems(path, prompt_key="q", answer_key="reward_model.ground_truth")
    assert got == [Problem("x?", "\\frac{1}{2}", "math")]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing field 'answer'"):
        load_problems(_write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"},
                                                            {"prompt": "b"}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_problems(bad)
    with pytest.raises(TypeError, match="p.jsonl:1: prompt must be text"):
        load_problems(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": 3, "answer": "1"}]))
    with pytest.raises(ValueError, match="unsupported data format '.csv'"):
        load_problems(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no records"):
        load_problems(_write_jsonl(tmp_path / "e.jsonl", []))


def test_parquet_reads_or_names_missing_pyarrow(tmp_path):
    path = tmp_path / "d.parquet"
    if not HAS_PYARROW:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_problems(path)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["1+1?", "2+2?"], "answer": ["2", "4"]}), path)
    assert load_problems(path) == [Problem("1+1?", "2", "math"), Problem("2+2?", "4", "math")]


def test_math_dataset_epochs_are_permutations():
    items = [Problem(str(i), str(i), "math") for i in range(5)]
    data = MathDataset(items, seed=3)
    first, second = data.problems(0, 5), data.problems(5, 5)
    assert sorted(p.prompt for p in first) == sorted(p.prompt for p in second) == list("01234")
    assert data.problems(0, 10) == MathDataset(items, seed=3).problems(0, 10)
    assert MathDataset(items, shuffle=False).problems(3, 4) == [items[3], items[4], items[0],
                                                                 items[1]]


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
@pytest.mark.parametrize("answer,response", [
    ("1/2", "0.5"),
    ("0.5", "The answer is \\boxed{\\frac{1}{2}}."),
    ("\\frac{1}{2}", "so it is 0.5"),
    ("\\sqrt{2}/2", "\\boxed{\\frac{1}{\\sqrt{2}}}"),
    ("x+1", "$1+x$"),
])
def test_math_reward_accepts_equivalent_forms(answer, response):
    assert math_reward(response, answer) == 1.0


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
@pytest.mark.parametrize("answer,response", [("1/2", "\\boxed{0.25}"), ("3", "\\boxed{4}"),
                                             ("3", "I do not know")])
def test_math_reward_rejects_wrong_answers(answer, response):
    assert math_reward(response, answer) == 0.0


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
def test_math_reward_works_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, "\\boxed{0.5}", "1/2").result() == 1.0
    assert MathDataset([Problem("q", "1/2", "math")]).reward(Problem("q", "1/2", "math"),
                                                             "\\boxed{0.5}") == 1.0


def test_missing_math_verify_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "math_verify":
            raise ImportError("no math_verify")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install math-verify"):
        math_reward("1", "1")
