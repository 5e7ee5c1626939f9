"""Data loading: the generated arithmetic set, GSM8K from local jsonl, and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GSM8K_DIR, TINY, run_train

from grpo.answer import extract_answer
from grpo.data import ArithmeticDataset, load_gsm8k

GOOD = {"question": "Ann has 2 pens and buys 3. How many now?", "answer": "2 + 3 = 5\n#### 5"}


def write_split(folder: Path, train: list[dict], test: list[dict] | None = None) -> Path:
    """A data folder with train.jsonl and test.jsonl, one JSON object per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test or [GOOD])):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / f"{name}.jsonl").write_text(text)
    return folder


def test_arithmetic_rows_are_gsm8k_format_and_seeded():
    data = ArithmeticDataset(num_train=50, num_test=10, seed=3)
    assert len(data.train) == 50 and len(data.test) == 10
    for row in data.train + data.test:
        assert extract_answer(row["answer"], strict=True) is not None
    assert data.train == ArithmeticDataset(num_train=50, num_test=10, seed=3).train
    assert data.train != ArithmeticDataset(num_train=50, num_test=10, seed=4).train


def test_arithmetic_held_out_split_is_fixed_and_disjoint_from_training():
    a = ArithmeticDataset(num_train=200, num_test=20, seed=1)
    b = ArithmeticDataset(num_train=200, num_test=20, seed=2)
    assert a.test == b.test
    assert not {r["question"] for r in a.test} & {r["question"] for r in a.train}


def test_local_gsm8k_copy_loads_with_limits():
    data = load_gsm8k(path=str(GSM8K_DIR), max_train_samples=5, max_test_samples=3)
    assert len(data.train) == 5 and len(data.test) == 3
    assert data.skipped == {"train": 0, "test": 0}


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"answer": "#### 5"}, "missing 'question' or 'answer'"),
        ({"question": "How many?"}, "missing 'question' or 'answer'"),
        ({"question": "How many?", "answer": "five"}, "answer has no parsable final '#### N'"),
    ],
    ids=["no-question", "no-answer", "no-final-number"],
)
def test_a_bad_row_stops_with_file_and_line(tmp_path, bad, problem):
    folder = write_split(tmp_path / "data", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError) as error:
        load_gsm8k(path=str(folder))
    message = str(error.value)
    assert f"{folder / 'train.jsonl'}, line 3: {problem}" in message
    assert "data.skip_invalid=true" in message


def test_skip_invalid_drops_and_counts_bad_rows(tmp_path):
    bad = [{"question": "q", "answer": "no number"}, {"answer": "#### 1"}]
    folder = write_split(tmp_path / "data", [GOOD, bad[0], GOOD, bad[1]], [bad[0], GOOD])
    data = load_gsm8k(path=str(folder), skip_invalid=True)
    assert data.train == [GOOD, GOOD] and data.test == [GOOD]
    assert data.skipped == {"train": 2, "test": 1}


def test_missing_data_file_is_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(FileNotFoundError, match=r"data.path: test file not found: .*test.jsonl"):
        load_gsm8k(path=str(folder))


def test_cli_stops_on_a_bad_row_before_loading_the_model(tmp_path):
    folder = write_split(tmp_path / "data", [GOOD, {"question": "q", "answer": "none"}])
    tiny = [o for o in TINY if not o.startswith("data.")]  # those are the arithmetic set's
    run_dir = tmp_path / "run"
    proc = run_train(
        *tiny, "data=gsm8k", f"data.path={folder}", f"hydra.run.dir={run_dir}", check=False
    )
    assert proc.returncode != 0
    assert f"{folder / 'train.jsonl'}, line 2: answer has no parsable final" in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout
