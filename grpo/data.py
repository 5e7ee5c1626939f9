"""Data sets of GSM8K-format problems: each row a `question` and an `answer` ending `#### N`.

- `ArithmeticDataset`: generated word problems (offline, seeded, with difficulty knobs and a
  held-out split fixed by its own seed);
- `load_gsm8k`: GSM8K from the hub (`openai/gsm8k`, config `main`) or from a local folder
  holding `train.jsonl` and `test.jsonl`, both through `datasets.load_dataset`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from grpo.answer import extract_answer

Row = dict[str, str]

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena"]
ITEMS = ["apple", "book", "coin", "pen", "card", "shell", "stamp", "marble", "cookie", "sticker"]


@dataclass
class Splits:
    """A training split, a held-out split, and how many invalid rows were skipped."""

    train: list[Row]
    test: list[Row]
    skipped: dict[str, int] = field(default_factory=dict)


def _problem(rng: random.Random, operation: str, max_operand: int, max_factor: int) -> Row:
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
    elif operation == "mul":
        a, b = rng.randint(2, max_factor), rng.randint(2, max_factor)
        c, sign = a * b, "*"
        question = (
            f"{name} buys {a} bags with {b} {item}s in each bag. How many {item}s does {name} buy?"
        )
    else:
        raise ValueError(f"data.operations: unknown operation {operation!r} (add, sub, mul)")
    answer = f"{name} has {a} {sign} {b} = <<{a}{sign}{b}={c}>>{c} {item}s.\n#### {c}"
    return {"question": question, "answer": answer}


class ArithmeticDataset(Splits):
    """Generated arithmetic word problems in GSM8K format.

    Difficulty knobs: `operations` (add, sub, mul), `max_operand` (largest addend / minuend),
    `max_factor` (largest factor of a product). The held-out split is drawn first from
    `test_seed`, so it stays the same whatever `seed` the training split uses, and no
    training question repeats a held-out one.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_test: int = 64,
        operations: tuple[str, ...] | list[str] = ("add", "sub", "mul"),
        max_operand: int = 20,
        max_factor: int = 9,
        seed: int = 0,
        test_seed: int = 1234,
    ) -> None:
        if max_operand < 1 or max_factor < 2:
            raise ValueError("data.max_operand must be >= 1 and data.max_factor >= 2")
        test = self._draw(num_test, operations, max_operand, max_factor, test_seed, set())
        seen = {r["question"] for r in test}
        train = self._draw(num_train, operations, max_operand, max_factor, seed, seen)
        super().__init__(train=train, test=test)

    @staticmethod
    def _draw(
        n: int, operations, max_operand: int, max_factor: int, seed: int, exclude: set[str]
    ) -> list[Row]:
        rng = random.Random(seed)
        rows: list[Row] = []
        for _ in range(n * 50):
            if len(rows) == n:
                break
            row = _problem(rng, rng.choice(list(operations)), max_operand, max_factor)
            if row["question"] not in exclude:
                rows.append(row)
        return rows


def _validate(rows: list[dict], source: str, skip_invalid: bool) -> tuple[list[Row], int]:
    """Keep rows with a question and a parsable `####` answer; else stop with the line number."""
    kept: list[Row] = []
    for line, row in enumerate(rows, start=1):
        problem = None
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            problem = "missing 'question' or 'answer'"
        elif extract_answer(row["answer"], strict=True) is None:
            problem = "answer has no parsable final '#### N' number"
        if problem is None:
            kept.append({"question": row["question"], "answer": row["answer"]})
        elif not skip_invalid:
            raise ValueError(
                f"{source}, line {line}: {problem} (set data.skip_invalid=true to skip)"
            )
    return kept, len(rows) - len(kept)


def load_gsm8k(
    path: str | None = None,
    hub_id: str = "openai/gsm8k",
    hub_config: str = "main",
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    skip_invalid: bool = False,
) -> Splits:
    """GSM8K from `path/{train,test}.jsonl` when `path` is set, else from the hub."""
    from datasets import load_dataset

    if path is not None:
        files = {split: Path(path).expanduser() / f"{split}.jsonl" for split in ("train", "test")}
        for split, file in files.items():
            if not file.is_file():
                raise FileNotFoundError(f"data.path: {split} file not found: {file}")
        raw = load_dataset("json", data_files={k: str(v) for k, v in files.items()})
        sources = {k: str(v) for k, v in files.items()}
    else:
        raw = load_dataset(hub_id, hub_config)
        sources = {k: f"{hub_id}[{hub_config}] split {k}" for k in ("train", "test")}
    limits = {"train": max_train_samples, "test": max_test_samples}
    splits, skipped = {}, {}
    for split in ("train", "test"):
        rows, skipped[split] = _validate(raw[split].to_list(), sources[split], skip_invalid)
        splits[split] = rows[: limits[split]] if limits[split] is not None else rows
    return Splits(train=splits["train"], test=splits["test"], skipped=skipped)
