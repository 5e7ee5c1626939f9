"""The competition-math task: LaTeX answers (fractions, roots, intervals) checked by
math-verify, loaded from local jsonl files the test writes, and a short training run on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, compose_config, step_lines
from hydra.utils import instantiate

from grpo.tasks.competition_math import CompetitionMath, MathVerifyReward
from grpo.train import train

PROBLEMS = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "answer": "\\frac{1}{2}"},
    {"problem": "Simplify $\\sqrt{27} / 3$.", "answer": "\\sqrt{3}"},
    {"problem": "Solve $0 \\le x < 1$ as an interval.", "answer": "[0, 1)"},
    {"problem": "What is $2^{10}$?", "answer": "1024"},
    {"problem": "What is $\\pi$ rounded down?", "answer": "3"},
    {"problem": "Write $\\{1, 2\\} \\cup \\{2, 3\\}$.", "answer": "\\{1, 2, 3\\}"},
]


def write(folder: Path, train: list[dict], test: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def math_dir(tmp_path) -> Path:
    return write(tmp_path / "math", PROBLEMS[2:], PROBLEMS[:2])


def test_loads_local_files_through_datasets(math_dir):
    task = CompetitionMath(path=str(math_dir))
    assert [r["answer"] for r in task.test] == ["\\frac{1}{2}", "\\sqrt{3}"]
    assert len(task.train) == 4 and task.stop_pattern is None
    assert "\\boxed{}" in task.prompt(task.train[0])


@pytest.mark.parametrize(
    ("completion", "answer", "strict", "lenient"),
    [
        ("So the sum is $\\boxed{\\frac12}$.", "\\frac{1}{2}", True, True),
        ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}", True, True),
        ("It is $\\boxed{3^{1/2}}$.", "\\sqrt{3}", True, True),
        ("Hence $x \\in \\boxed{[0,1)}$.", "[0, 1)", True, True),
        ("Hence $x \\in \\boxed{[0,1]}$.", "[0, 1)", False, False),  # the closed end differs
        ("The result is $\\frac{1}{2}$", "\\frac{1}{2}", False, True),  # not boxed: lenient only
        ("$\\boxed{\\{3, 2, 1\\}}$", "\\{1, 2, 3\\}", True, True),  # sets: order does not matter
        ("I do not know.", "1024", False, False),
    ],
)
def test_latex_answers_are_checked_by_math_verify(completion, answer, strict, lenient, math_dir):
    task = CompetitionMath(path=str(math_dir))
    row = {"question": "q", "answer": answer}
    assert task.check(completion, row) == {
        "accuracy_strict": float(strict),
        "accuracy_lenient": float(lenient),
    }
    assert task.correct(completion, row) == lenient
    assert MathVerifyReward()([completion], [answer]).total == [float(lenient)]


def test_majority_votes_count_equal_answers_written_differently(math_dir):
    task = CompetitionMath(path=str(math_dir))
    assert task.answer_of("$\\boxed{0.5}$") == task.answer_of("$\\boxed{\\frac{1}{2}}$")
    assert task.answer_of("nothing here") is None


def test_one_split_holds_out_its_first_rows(tmp_path):
    folder = write(tmp_path / "math", PROBLEMS, PROBLEMS)
    task = CompetitionMath(path=str(folder), train_split="test", test_split="test", num_test=2)
    # A local folder always has both files: train.jsonl trains, test.jsonl's first rows test.
    assert len(task.test) == 2 and len(task.train) == 6


def test_an_unparsable_answer_stops_with_its_file_and_line(tmp_path):
    folder = write(
        tmp_path / "math", PROBLEMS[:1] + [{"problem": "p", "answer": "\\frac{"}], PROBLEMS[:1]
    )
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: answer '\\\\frac\{' is not LaTeX"):
        CompetitionMath(path=str(folder))
    assert len(CompetitionMath(path=str(folder), skip_invalid=True).train) == 1


def test_task_math_trains_with_its_own_reward(math_dir, tmp_path):
    overrides = [o for o in TINY if not o.startswith("task.")]
    cfg = compose_config(
        *overrides, "task=math", f"task.path={math_dir}", "eval.comparison.at_end=false"
    )
    assert cfg.reward._target_ == "grpo.tasks.competition_math.MathVerifyReward"
    assert isinstance(instantiate(cfg.reward), MathVerifyReward)
    train(cfg, tmp_path / "run")
    lines = step_lines(tmp_path / "run")
    assert len(lines) == 2 and "rewards/correctness" in lines[0]
    assert {"eval/accuracy_strict", "eval/accuracy_lenient"} <= set(lines[-1])
