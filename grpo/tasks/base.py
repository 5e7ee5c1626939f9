"""A task: a data set and everything that depends on its format.

A `Task` holds the training and held-out rows (each a dict with at least `question` and
`answer`), and says how a row becomes a prompt, where generation stops, and how a completion
is checked. Its default reward is the `reward=` option its YAML picks (`conf/task/*.yaml`);
the held-out evaluation reports the means of `check` and pass@k / maj@k from `correct` and
`answer_of`. One module per task in this folder, one YAML in `conf/task/`
(docs/extending.md walks through adding one).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]
# A data file's extension -> the `datasets` builder that reads it (tried in this order).
DATA_FILES = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


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

    def columns(self, row: Row) -> dict[str, Any]:
        """The row's other columns (beyond its prompt and answer), which reward functions
        receive as keyword arguments (`grpo.tasks.rewards.FunctionReward`); none here."""
        return {}

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
    path: str | None,
    hub_id: str,
    hub_config: str | None,
    splits: Sequence[str] = ("train", "test"),
) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Raw rows by split, and where each split came from (for error messages): from the files
    `path/SPLIT.jsonl` (or `.json`, `.parquet`, `.csv`) of `splits` when `path` is set, else
    every split of the hub data set; both through `datasets.load_dataset`. A missing file is
    named with `task.path`, an unreadable one with its path."""
    from datasets import load_dataset

    if path is None:
        raw = load_dataset(hub_id, hub_config)
        return {k: v.to_list() for k, v in raw.items()}, {k: f"{hub_id} split {k}" for k in raw}
    files = {split: data_file(path, split) for split in splits}
    rows = {}
    for split, file in files.items():
        try:
            rows[split] = read_file(file)
        except ValueError as error:
            raise ValueError(f"task.path={path!r}: {split} file {error}") from error
    return rows, {split: str(file) for split, file in files.items()}


def read_file(file: Path) -> list[dict]:
    """A data file's rows through `datasets.load_dataset`; ValueError naming the file when it
    has no rows or `datasets` cannot read it."""
    from datasets import load_dataset

    ext = file.suffix[1:]
    try:
        data = load_dataset(DATA_FILES[ext], data_files=str(file), split="train")
    except Exception as error:  # datasets fails on a file without rows, and says it at length
        if no_rows(file):
            raise ValueError(f"{file}: no rows") from None
        gist = str(error).strip().split("\n")[0] or type(error).__name__
        raise ValueError(f"{file}: not readable as {ext} ({gist})") from error
    if len(data) == 0:
        raise ValueError(f"{file}: no rows")
    return data.to_list()


def no_rows(file: Path) -> bool:
    """Whether a data file holds no rows: jsonl blank, json `[]`, csv a header at most, parquet
    a table of 0 rows."""
    ext = file.suffix[1:]
    try:
        if ext == "parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_metadata(file).num_rows == 0
        text = file.read_text().strip()
        if ext == "json":
            return json.loads(text or "[]") in ([], {})
        return len(text.splitlines()) <= (1 if ext == "csv" else 0)
    except (OSError, ValueError):  # not even that: unreadable, which the caller says
        return False


def data_file(path: str, split: str) -> Path:
    """The one file `path/SPLIT.EXT` for an extension of `DATA_FILES`."""
    folder = Path(path).expanduser()
    found = [
        folder / f"{split}.{ext}" for ext in DATA_FILES if (folder / f"{split}.{ext}").is_file()
    ]
    others = ", ".join(f".{ext}" for ext in list(DATA_FILES)[1:])
    if not found:
        raise FileNotFoundError(
            f"task.path={path!r}: {split} file not found: {folder / split}.jsonl (nor {others})"
        )
    if len(found) > 1:
        raise ValueError(f"task.path={path!r}: {' and '.join(map(str, found))}: keep one")
    return found[0]


def keep_valid(
    raw: Sequence[dict],
    source: str,
    skip_invalid: bool,
    convert: Callable[[dict], Row | str],
) -> tuple[list[Row], int]:
    """The rows `convert` accepts (it returns the task's row, or what is wrong with the raw
    one); a bad row stops the run with its file and line, or with `skip_invalid` is skipped.
    Returns the rows kept and the number skipped."""
    kept: list[Row] = []
    for line, row in enumerate(raw, start=1):
        converted = convert(row)
        if not isinstance(converted, str):
            kept.append(converted)
        elif not skip_invalid:
            raise ValueError(
                f"{source}, line {line}: {converted} (set task.skip_invalid=true to skip)"
            )
    return kept, len(raw) - len(kept)
