"""Any data set as a task: columns mapped from YAML, a prompt template, an answer checker by name.

`DatasetTask` reads a hub data set (`hub_id`, `hub_config`) or a local folder holding
`SPLIT.jsonl`, `.json`, `.parquet` or `.csv` (`path`), both through `datasets.load_dataset`
(`grpo.tasks.base.load_rows`). A row's prompt is its `prompt_key` column put into `template` (a
format string over the row's columns), or its `messages_key` column's chat messages as they are;
its ground truth is the `answer_key` column. The held-out rows are `test_split`'s, or the first
`num_test` rows of the training split. Completions are checked by a checker of
`ANSWER_CHECKERS` (`gsm8k`, `math_verify`, `exact`, `regex`) or by your own function, named by
its dotted path; `CheckerReward` pays what the checker counts right. Bad input (a missing
column, an empty split, a template key that is no column, an unknown checker) stops the run
with one line naming the key and the file or data set, before any model loads.

A row is `{"question": the prompt column's text (the last user message's), "answer": the
answer column as text, "columns": the row's other columns}`, plus `"messages"` with
`messages_key`; reward functions receive the other columns by name (`Task.columns`).
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from grpo.registry import Registry, import_function
from grpo.tasks import gsm8k
from grpo.tasks.answers import extract_answer
from grpo.tasks.base import Row, Splits, Task, keep_valid, load_rows
from grpo.tasks.rewards import Completions, Reward

ROLES = ("system", "user", "assistant")


def _as_is(text: str) -> str:
    return text


def _no_problem(answer: str) -> str | None:
    return None


@dataclass(frozen=True)
class Checker:
    """How completions are checked against ground-truth answers, as functions of text.

    `scores(completion, answer)`: the held-out checks by `eval/` name, `accuracy_strict` among
    them; `correct(completion, answer)`: the verdict of pass@k and maj@k; `answer_of(completion)`:
    what maj@k votes on (None: no answer); `problem(answer)`: what is wrong with a ground truth
    (None: nothing), checked as the rows load; `ground_truth(answer)`: the answer as sample
    tables show it; `reference(answer)`: a completion the checker counts right.
    """

    scores: Callable[[str, str], dict[str, float]]
    correct: Callable[[str, str], bool]
    answer_of: Callable[[str], Hashable | None]
    problem: Callable[[str], str | None] = _no_problem
    ground_truth: Callable[[str], str] = _as_is
    reference: Callable[[str], str] = _as_is


def strict_only(
    correct: Callable[[str, str], bool], answer_of: Callable[[str], Hashable | None]
) -> Checker:
    """A checker whose one held-out check, `accuracy_strict`, is `correct`'s verdict."""
    return Checker(lambda c, a: {"accuracy_strict": float(correct(c, a))}, correct, answer_of)


# Answer checkers by name: each entry takes its settings as keyword-only arguments (what
# `task.checker` may set beside `name`) and returns a `Checker`.
ANSWER_CHECKERS = Registry("answer checker")


@ANSWER_CHECKERS.register("gsm8k")
def gsm8k_checker() -> Checker:
    """GSM8K's `#### N` answers, read by `grpo.tasks.answers` (GSM8K's own checks:
    accuracy_strict, accuracy_lenient, accuracy_anywhere, avg_math_score; lenient verdict)."""
    return Checker(
        gsm8k.scores, gsm8k.is_correct, extract_answer, gsm8k.answer_problem, gsm8k.final_number
    )


@ANSWER_CHECKERS.register("math_verify")
def math_verify_checker() -> Checker:
    """LaTeX answers compared by math-verify (`task=math`'s checks: accuracy_strict for the
    \\boxed{} answer, accuracy_lenient; lenient verdict)."""
    from grpo.tasks import competition_math as cm  # math-verify is imported only when used

    return Checker(
        cm.scores, cm.is_correct, cm.parsed_answer, cm.answer_problem, reference=cm.boxed
    )


@ANSWER_CHECKERS.register("exact")
def exact_checker() -> Checker:
    """The completion is the answer, both stripped of surrounding whitespace."""
    return strict_only(lambda completion, answer: completion.strip() == answer.strip(), str.strip)


@ANSWER_CHECKERS.register("regex")
def regex_checker(*, pattern: str) -> Checker:
    """The last match of `pattern` (a regex with one group) in the completion: its group,
    stripped, is the answer, stripped."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"pattern={pattern!r}: not a regex ({error})") from None
    if compiled.groups != 1:
        raise ValueError(f"pattern={pattern!r}: needs one group, has {compiled.groups}")

    def found(completion: str) -> str | None:
        matches = compiled.findall(completion)
        return matches[-1].strip() if matches else None

    return strict_only(lambda completion, answer: found(completion) == answer.strip(), found)


def build_checker(node: Mapping[str, Any] | None, key: str) -> Checker:
    """The checker that the config node at `key` names: `{name: NAME, **settings}` with NAME
    in `ANSWER_CHECKERS`, or NAME a function's dotted path `module.function`, called as
    `function(completion, answer, **settings)` and true for a right answer (held-out check:
    `accuracy_strict`; maj@k votes on the stripped completion). ValueError naming the key."""
    settings = dict(node or {})
    name = settings.pop("name", None)
    registered = f"registered: {', '.join(ANSWER_CHECKERS)}; or a dotted path module.function"
    if not isinstance(name, str):
        raise ValueError(f"{key}.name: missing; {registered}")
    if "." in name:
        function = import_function(name, f"{key}.name")
        try:
            inspect.signature(function).bind("completion", "answer", **settings)
        except TypeError as error:
            raise ValueError(
                f"{key}.name={name!r}: cannot be called as (completion, answer, **settings of "
                f"{key}) ({error})"
            ) from None
        except ValueError:  # no signature to read (some builtins): the first call will tell
            pass
        return strict_only(lambda c, a: bool(function(c, a, **settings)), str.strip)
    if name not in ANSWER_CHECKERS:
        raise ValueError(f"{key}.name={name!r}: unknown answer checker; {registered}")
    ANSWER_CHECKERS.check(name, settings, f"{key}.name")
    try:
        return ANSWER_CHECKERS[name](**settings)
    except ValueError as error:
        raise ValueError(f"{key}.{error}") from None


class CheckerReward(Reward):
    """1 when the answer checker `checker` (as `task.checker`: `{name: ..., **settings}`)
    counts the completion right, else 0: `task=dataset`'s default reward. Part:
    ``correctness``."""

    def __init__(self, checker: Mapping[str, Any] | None = None) -> None:
        self.checker = build_checker(checker or {"name": "exact"}, "reward.checker")

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        pairs = zip(batch.texts, batch.answers, strict=True)
        return {"correctness": [float(self.checker.correct(t, a)) for t, a in pairs]}


def template_keys(template: str) -> list[str]:
    """The column names a format string's fields use (`{question}`, `{meta[level]}`)."""
    try:
        fields = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as error:
        raise ValueError(f"task.template={template!r}: not a format string ({error})") from None
    names = [re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields]
    if any(not name or name.isdigit() for name in names):
        raise ValueError(f"task.template={template!r}: each {{...}} must name a column")
    return names


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _messages_problem(messages: Any) -> str | None:
    """What keeps `messages` from being a chat prompt: a list of {role, content} texts,
    roles among `ROLES`, the user's last."""
    if not isinstance(messages, list) or not messages:
        return "not a non-empty list of messages"
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            return f"message {message!r:.60} has no text 'content'"
        if message.get("role") not in ROLES:
            return f"message role {message.get('role')!r} is none of {', '.join(ROLES)}"
    if messages[-1]["role"] != "user":
        return "the last message is not the user's"
    return None


class DatasetTask(Task):
    """Rows of any data set, mapped by column names; see the module docstring and
    `conf/task/dataset.yaml` for every setting."""

    def __init__(
        self,
        path: str | None = None,
        hub_id: str | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        test_split: str | None = "test",
        num_test: int | None = None,
        max_train_samples: int | None = None,
        prompt_key: str | None = "question",
        messages_key: str | None = None,
        answer_key: str = "answer",
        template: str | None = None,
        checker: Mapping[str, Any] | None = None,
        skip_invalid: bool = False,
        stop_pattern: str | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.checker = build_checker(checker or {"name": "exact"}, "task.checker")
        if (prompt_key is None) == (messages_key is None):
            raise ValueError(
                f"task.prompt_key={prompt_key!r}, task.messages_key={messages_key!r}: set one"
            )
        if messages_key is not None and template is not None:
            raise ValueError(
                f"task.template={template!r}: the messages of task.messages_key are used as "
                "they are; set task.template=null"
            )
        keys = template_keys(template) if template is not None else []
        if stop_pattern is not None:
            try:
                re.compile(stop_pattern)
            except re.error as error:
                why = f"not a regex ({error})"
                raise ValueError(f"task.stop_pattern={stop_pattern!r}: {why}") from None
        if path is None and hub_id is None:
            raise ValueError("task.path=None, task.hub_id=None: set a local folder or a hub id")
        held_out = test_split is None or test_split == train_split
        if held_out and num_test is None:
            raise ValueError(
                f"task.num_test=None: needed to hold out rows of task.train_split={train_split!r}"
                " (task.test_split is null or the same split)"
            )
        if num_test is not None and num_test < 0:
            raise ValueError(f"task.num_test={num_test}: must be >= 0 (or null)")
        self.prompt_key, self.messages_key, self.answer_key = prompt_key, messages_key, answer_key
        self.template = template

        named = {"train": train_split} if held_out else {"train": train_split, "test": test_split}
        raw, sources = load_rows(path, hub_id, hub_config, tuple(named.values()))
        rows, skipped = {}, {}
        for which, split in named.items():
            if split not in raw:
                raise ValueError(
                    f"task.{which}_split={split!r}: not a split of {hub_id} (splits: "
                    f"{', '.join(raw)})"
                )
            source = sources[split]
            if not raw[split]:
                raise ValueError(f"task.{which}_split={split!r}: no rows in {source}")
            self._check_columns(list(raw[split][0]), keys, source)
            rows[which], skipped[which] = keep_valid(raw[split], source, skip_invalid, self._row)
        if held_out:
            train = rows["train"]
            if num_test >= len(train):
                raise ValueError(
                    f"task.num_test={num_test}: leaves no training rows of the {len(train)} "
                    f"in {sources[train_split]}"
                )
            rows["train"], rows["test"] = train[num_test:], train[:num_test]
        elif num_test is not None:
            rows["test"] = rows["test"][:num_test]
        if max_train_samples is not None:
            rows["train"] = rows["train"][:max_train_samples]
        super().__init__(Splits(rows["train"], rows["test"], skipped), stop_pattern, system_prompt)

    def _check_columns(self, columns: list[str], template_keys: list[str], source: str) -> None:
        """Each named column and each template key is a column of the split at `source`."""
        named = {
            "task.prompt_key": self.prompt_key,
            "task.messages_key": self.messages_key,
            "task.answer_key": self.answer_key,
        }
        named |= {f"task.template key {k!r}": k for k in template_keys}
        for key, column in named.items():
            if column is not None and column not in columns:
                value = "" if key.startswith("task.template") else f"={column!r}"
                raise ValueError(
                    f"{key}{value}: not a column of {source} (columns: {', '.join(columns)})"
                )

    def _row(self, raw: dict[str, Any]) -> Row | str:
        """The task's row of a raw one, or what is wrong with it."""
        answer = raw[self.answer_key]
        if _missing(answer):
            return f"no answer (task.answer_key={self.answer_key!r})"
        answer = answer if isinstance(answer, str) else str(answer)
        if problem := self.checker.problem(answer):
            return problem
        used = {self.prompt_key, self.messages_key, self.answer_key}
        row = {"answer": answer, "columns": {k: v for k, v in raw.items() if k not in used}}
        if self.messages_key is not None:
            messages = raw[self.messages_key]
            if problem := _messages_problem(messages):
                return f"task.messages_key={self.messages_key!r}: {problem}"
            row["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
            return {"question": messages[-1]["content"], **row}
        question = raw[self.prompt_key]
        if not isinstance(question, str):
            return f"task.prompt_key={self.prompt_key!r}: not text but {question!r:.60}"
        return {"question": question, **row}

    def prompt(self, row: Row) -> str:
        """The prompt column's text in `template` (the text as is without one); with
        `messages_key`, the last user message."""
        if self.template is None or self.messages_key is not None:
            return row["question"]
        fields = {**row.get("columns", {}), self.prompt_key: row["question"]}
        return self.template.format_map({**fields, self.answer_key: row["answer"]})

    def messages(self, row: Row) -> list[dict[str, str]]:
        """The row's chat messages as they are (after the system prompt, when there is one);
        a prompt column's text as one user message."""
        if "messages" not in row:
            return super().messages(row)
        system = [] if self.system_prompt is None else [self.system_prompt]
        return [{"role": "system", "content": s} for s in system] + list(row["messages"])

    def columns(self, row: Row) -> dict[str, Any]:
        return row.get("columns", {})

    def ground_truth(self, row: Row) -> str:
        return self.checker.ground_truth(row["answer"])

    def reference_completion(self, row: Row) -> str:
        return self.checker.reference(row["answer"])

    def check(self, completion: str, row: Row) -> dict[str, float]:
        return self.checker.scores(completion, row["answer"])

    def correct(self, completion: str, row: Row) -> bool:
        return self.checker.correct(completion, row["answer"])

    def answer_of(self, completion: str) -> Hashable | None:
        return self.checker.answer_of(completion)
