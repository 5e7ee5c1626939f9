"""The GSM8K task: loading local jsonl through `datasets` (the hub's code path), bad rows named
by file and line, and the GSM8K-format prompt, stop rule and checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, run_train

from grpo.tasks.base import Splits
from grpo.tasks.gsm8k import GSM8K, STOP_PATTERN, GSM8KFormat

GOOD = {"question": "Ann has 2 pens and buys 3. How many now?", "answer": "2 + 3 = 5\n#### 5"}


def write_split(folder: Path, train: list[dict], test: list[dict] | None = None) -> Path:
    """A data folder with train.jsonl and test.jsonl, one JSON object per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test or [GOOD])):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / f"{name}.jsonl").write_text(text)
    return folder


def test_local_gsm8k_copy_loads_with_limits(gsm8k_dir):
    task = GSM8K(path=str(gsm8k_dir), max_train_samples=5, max_test_samples=3)
    assert len(task.train) == 5 and len(task.test) == 3
    assert task.skipped == {"train": 0, "test": 0}
    whole = GSM8K(path=str(gsm8k_dir))
    assert (len(whole.train), len(whole.test)) == (7473, 1319)


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
        GSM8K(path=str(folder))
    message = str(error.value)
    assert f"{folder / 'train.jsonl'}, line 3: {problem}" in message
    assert "task.skip_invalid=true" in message


def test_skip_invalid_drops_and_counts_bad_rows(tmp_path):
    bad = [{"question": "q", "answer": "no number"}, {"answer": "#### 1"}]
    folder = write_split(tmp_path / "data", [GOOD, bad[0], GOOD, bad[1]], [bad[0], GOOD])
    task = GSM8K(path=str(folder), skip_invalid=True)
    assert task.train == [GOOD, GOOD] and task.test == [GOOD]
    assert task.skipped == {"train": 2, "test": 1}


def test_missing_data_file_is_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(
        FileNotFoundError, match=r"task.path='.*': test file not found: .*test.jsonl"
    ):
        GSM8K(path=str(folder))


def test_cli_stops_on_a_bad_row_before_loading_the_model(tmp_path):
    folder = write_split(tmp_path / "data", [GOOD, {"question": "q", "answer": "none"}])
    tiny = [o for o in TINY if not o.startswith("task.")]  # those are the arithmetic set's
    run_dir = tmp_path / "run"
    proc = run_train(
        *tiny, "task=gsm8k", f"task.path={folder}", f"hydra.run.dir={run_dir}", check=False
    )
    assert proc.returncode == 2
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error: "))
    assert f"{folder / 'train.jsonl'}, line 2: answer has no parsable final" in line
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr + proc.stdout


def test_gsm8k_format_prompt_stop_rule_and_checks():
    task = GSM8KFormat(Splits([GOOD], [GOOD]))
    assert task.stop_pattern == STOP_PATTERN
    assert GOOD["question"] in task.prompt(GOOD) and '"#### [number]"' in task.prompt(GOOD)
    assert task.ground_truth({"answer": "so 1,000 in all\n#### 1,000"}) == "1,000"
    checks = task.check("2 + 3 makes 5. The answer is 5", GOOD)
    assert checks == {
        "accuracy_strict": 0.0,
        "accuracy_lenient": 1.0,
        "accuracy_anywhere": 1.0,
        "avg_math_score": 1.0,
    }
    assert task.check("#### 5", GOOD)["accuracy_strict"] == 1.0
    assert task.check("I think 4, not 5... #### 4", GOOD) == {
        "accuracy_strict": 0.0,
        "accuracy_lenient": 0.0,
        "accuracy_anywhere": 1.0,
        "avg_math_score": 0.0,
    }
    assert task.correct("the answer is 5", GOOD) and not task.correct("#### 6", GOOD)
    assert task.answer_of("#### 1,000") == task.answer_of("so 1000") == 1000.0
