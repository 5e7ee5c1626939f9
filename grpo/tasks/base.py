"""A task: a data set and everything that depends on its format.

A `Task` holds the training and held-out rows (each a dict with at least `question` and
`answer`), and says how a row becomes a prompt, where generation stops, and how a completion
is checked. Its default reward is the `reward=` option its YAML picks (`conf/task/*.yaml`);
the held-out evaluation reports the means of `check` and pass@k / maj@k from `correct` and
`answer_of`. One module per task in this folder, one YAML in `conf/task/`
(docs/extending.md walks through adding one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass
class Splits:
    """A training split, a held-out split, and how many invalid rows were skipped."""

    train: list[Row]
    test: list[Row]
    skipped: dict[str, int] = field(default_factory=dict)


class Task(ABC):
    """Rows, prompt, stop rule and answer checks of one data set.

    Subclasses load `self.train` / `self.test` in their constructor (before any model loads,
    so a bad file stops the run early) and implement `prompt`, `check`, `correct` and
    `answer_of`. `stop_pattern`: a regex; a completion ends once its text matches (None: at EOS
    or the token budget). `system_prompt`: an optional system message for chat models.
    `examples`: fixed problems the model comparison shows before held-out ones.
    """

    examples: list[Row] = []

    def __init__(
        self, splits: Splits, stop_pattern: str | None = None, system_prompt: str | None = None
    ) -> None:
        if not splits.train:
            raise ValueError(f"task: the training split of {type(self).__name__} is empty")
        self.train, self.test, self.skipped = splits.train, splits.test, splits.skipped
        self.stop_pattern = stop_pattern
        self.system_prompt = system_prompt

    @abstractmethod
    def prompt(self, row: Row) -> str:
        """The user message for `row`."""

    def messages(self, row: Row) -> list[dict[str, str]]:
        """`row`'s prompt as chat messages (the system prompt first, when there is one)."""
        user = {"role": "user", "content": self.prompt(row)}
        if self.system_prompt is None:
            return [user]
        return [{"role": "system", "content": self.system_prompt}, user]

    def answer(self, row: Row) -> str:
        """The ground truth that rewards score a completion against."""
        return row["answer"]

    def ground_truth(self, row: Row) -> str:
        """The reference answer as a reader wants to see it (sample tables, comparisons)."""
        return self.answer(row)

    def reference_completion(self, row: Row) -> str:
        """A completion this task counts as right for `row`: what the model should write."""
        return self.answer(row)

    @abstractmethod
    def check(self, completion: str, row: Row) -> dict[str, float]:
        """Per-completion scores for the held-out evaluation, by their `eval/` metric names;
        `accuracy_strict` (the default objective) among them."""

    @abstractmethod
    def correct(self, completion: str, row: Row) -> bool:
        """Whether the completion's answer is right (pass@k, maj@k)."""

    @abstractmethod
    def answer_of(self, completion: str) -> Hashable | None:
        """The completion's answer in a form that equal answers share (maj@k votes); None when
        it gives none."""


def load_rows(
    path: str | None, hub_id: str, hub_config: str | None
) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Raw rows by split, and where each split came from (for error messages): from
    `path/train.jsonl` and `path/test.jsonl` when `path` is set, else from the hub; both through
    `datasets.load_dataset`. A missing file is named with `task.path`."""
    from datasets import load_dataset

    if path is None:
        raw = load_dataset(hub_id, hub_config)
        return {k: v.to_list() for k, v in raw.items()}, {k: f"{hub_id} split {k}" for k in raw}
    files = {split: Path(path).expanduser() / f"{split}.jsonl" for split in ("train", "test")}
    for split, file in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"task.path={path!r}: {split} file not found: {file}")
    raw = load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    return {k: v.to_list() for k, v in raw.items()}, {k: str(v) for k, v in files.items()}
