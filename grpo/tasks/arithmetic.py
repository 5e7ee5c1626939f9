"""Generated arithmetic word problems in GSM8K format: offline, seeded, with difficulty knobs.

The quickstart's task (`make train`): SmolLM2-135M-Instruct answers about a quarter of them
right at temperature 0.7 before training, so GRPO has groups with reward spread from the start.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from grpo.tasks.base import Row, Splits
from grpo.tasks.gsm8k import GSM8KFormat

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena"]
ITEMS = ["apple", "book", "coin", "pen", "card", "shell", "stamp", "marble", "cookie", "sticker"]
OPERATIONS = ("add", "sub", "mul")


def problem(rng: random.Random, operation: str, max_operand: int, max_factor: int) -> Row:
    """One word problem and its GSM8K-style solution ending `#### N`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if operation == "add":
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        c, sign = a + b, "+"
        question = (
            f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        )
    elif operation == "sub":
        a, b = sorted((rng.randint(1, max_operand), rng.randint(1, max_operand)), reverse=True)
        c, sign = a - b, "-"
        question = (
            f"{name} had {a} {item}s and gave away {b}. How many {item}s does {name} have left?"
        )
    else:
        a, b = rng.randint(2, max_factor), rng.randint(2, max_factor)
        c, sign = a * b, "*"
        question = (
            f"{name} buys {a} bags with {b} {item}s in each bag. How many {item}s does {name} buy?"
        )
    answer = f"{name} has {a} {sign} {b} = <<{a}{sign}{b}={c}>>{c} {item}s.\n#### {c}"
    return {"question": question, "answer": answer}


def draw(
    n: int,
    operations: Sequence[str],
    max_operand: int,
    max_factor: int,
    seed: int,
    exclude: set[str],
) -> list[Row]:
    """`n` problems from `seed`, none whose question is in `exclude`."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for _ in range(n * 50):
        if len(rows) == n:
            break
        row = problem(rng, rng.choice(list(operations)), max_operand, max_factor)
        if row["question"] not in exclude:
            rows.append(row)
    return rows


class Arithmetic(GSM8KFormat):
    """Generated add / subtract / multiply word problems.

    Difficulty knobs: `operations` (add, sub, mul), `max_operand` (largest addend / minuend),
    `max_factor` (largest factor of a product). The held-out split is drawn first from
    `test_seed`, so it stays the same whatever `seed` the training split uses, and no
    training question repeats a held-out one.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_test: int = 64,
        operations: Sequence[str] = OPERATIONS,
        max_operand: int = 20,
        max_factor: int = 9,
        seed: int = 0,
        test_seed: int = 1234,
        **format_settings: str | None,
    ) -> None:
        unknown = sorted(set(operations) - set(OPERATIONS))
        if unknown:
            raise ValueError(f"task.operations: unknown {unknown}; choose from {OPERATIONS}")
        if max_operand < 1 or max_factor < 2:
            raise ValueError("task.max_operand must be >= 1 and task.max_factor >= 2")
        test = draw(num_test, operations, max_operand, max_factor, test_seed, set())
        seen = {r["question"] for r in test}
        train = draw(num_train, operations, max_operand, max_factor, seed, seen)
        super().__init__(Splits(train, test), **format_settings)


def tokenizer_corpus() -> list[str]:
    """Text to train a small tokenizer on (the tiny test model's): 2000 problems with their
    answers."""
    task = Arithmetic(num_train=2000, num_test=0, seed=0)
    return [task.prompt(row) + " " + row["answer"] for row in task.train]
