"""The arithmetic task: GSM8K-format rows, seeded, a held-out split fixed by its own seed."""

from __future__ import annotations

import pytest

from grpo.tasks.answers import extract_answer
from grpo.tasks.arithmetic import Arithmetic


def test_arithmetic_rows_are_gsm8k_format_and_seeded():
    task = Arithmetic(num_train=50, num_test=10, seed=3)
    assert len(task.train) == 50 and len(task.test) == 10
    for row in task.train + task.test:
        assert extract_answer(row["answer"], strict=True) is not None
    assert task.train == Arithmetic(num_train=50, num_test=10, seed=3).train
    assert task.train != Arithmetic(num_train=50, num_test=10, seed=4).train


def test_arithmetic_held_out_split_is_fixed_and_disjoint_from_training():
    a = Arithmetic(num_train=200, num_test=20, seed=1)
    b = Arithmetic(num_train=200, num_test=20, seed=2)
    assert a.test == b.test
    assert not {r["question"] for r in a.test} & {r["question"] for r in a.train}


def test_difficulty_knobs_are_checked():
    with pytest.raises(ValueError, match=r"task.operations: unknown \['div'\]"):
        Arithmetic(num_train=2, num_test=1, operations=["add", "div"])
    with pytest.raises(ValueError, match="task.max_factor"):
        Arithmetic(num_train=2, num_test=1, max_factor=1)
    only_sums = Arithmetic(num_train=20, num_test=2, operations=["add"])
    assert all("gets" in row["question"] for row in only_sums.train)
