"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168, MIT): grade-school word problems, answers `#### N`.

`GSM8KFormat` is what every data set of this shape shares (the arithmetic task too): the
seed's prompt, generation that stops at the `#### N` line, and answers read with the one
extractor of `grpo.tasks.answers` for ground truth and completions. `GSM8K` loads the data set
from the hub (`openai/gsm8k`, config `main`) or from a local folder holding `train.jsonl` and
`test.jsonl`, both through `datasets.load_dataset`; every row is checked on load.
"""

from __future__ import annotations

import re
from collections.abc import Hashable

from grpo.tasks.answers import ANSWER_MARKER, answers_match, extract_answer, parse_number
from grpo.tasks.base import Row, Splits, Task, keep_valid, load_rows

PROMPT_TEMPLATE = (
    "Question: {question}\n\n"
    'Please solve this step by step and provide your final answer in the format "#### [number]".'
    "\n\nAnswer:"
)
# A completion ends at its `#### N` line (the number, then a newline).
STOP_PATTERN = r"####\s*-?[\d,]*\.?\d+\s*\n"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_anywhere(text: str, truth: float | None) -> bool:
    """True when any number written in `text` equals `truth`."""
    return any(answers_match(parse_number(m), truth) for m in _NUMBER.findall(text))


def scores(completion: str, answer: str) -> dict[str, float]:
    """The held-out checks of a completion against a `#### N` answer (`GSM8KFormat`)."""
    truth = extract_answer(answer, strict=True)
    lenient = float(answers_match(extract_answer(completion), truth))
    return {
        "accuracy_strict": float(answers_match(extract_answer(completion, strict=True), truth)),
        "accuracy_lenient": lenient,
        "accuracy_anywhere": float(answer_anywhere(completion, truth)),
        "avg_math_score": lenient,
    }


def is_correct(completion: str, answer: str) -> bool:
    """The lenient check: the completion's answer, with fallbacks, is the `#### N` number."""
    return answers_match(extract_answer(completion), extract_answer(answer, strict=True))


def final_number(answer: str) -> str:
    """The number written after the last `####` of an answer, as written."""
    return answer.rsplit(ANSWER_MARKER, 1)[-1].strip()


def answer_problem(answer: str) -> str | None:
    """What is wrong with a ground-truth answer (no final `#### N`); None when it is fine."""
    if extract_answer(answer, strict=True) is None:
        return "answer has no parsable final '#### N' number"
    return None


class GSM8KFormat(Task):
    """A task whose rows are GSM8K-shaped: a `question`, an `answer` ending `#### N`.

    Held-out checks: `accuracy_strict` (the number after `####` is right), `accuracy_lenient`
    (with the extractor's fallbacks: "the answer is N", \\boxed{N}, the last number),
    `accuracy_anywhere` (the right number appears anywhere) and `avg_math_score`, the seed's
    name for the lenient accuracy. `correct` is the lenient check.
    """

    examples = [  # the seed's test prompts
        {"question": "What is 15 + 27?", "answer": "#### 42"},
        {"question": "Solve for x: 2x + 5 = 13", "answer": "#### 4"},
        {
            "question": "What is the area of a rectangle with length 8 and width 6?",
            "answer": "#### 48",
        },
    ]

    def __init__(
        self,
        splits: Splits,
        stop_pattern: str | None = STOP_PATTERN,
        system_prompt: str | None = None,
        template: str = PROMPT_TEMPLATE,
    ) -> None:
        super().__init__(splits, stop_pattern, system_prompt)
        self.template = template

    def prompt(self, row: Row) -> str:
        return self.template.format(question=row["question"])

    def ground_truth(self, row: Row) -> str:
        """The number written after the last `####`."""
        return final_number(row["answer"])

    def check(self, completion: str, row: Row) -> dict[str, float]:
        return scores(completion, row["answer"])

    def correct(self, completion: str, row: Row) -> bool:
        return is_correct(completion, row["answer"])

    def answer_of(self, completion: str) -> Hashable | None:
        return extract_answer(completion)


def validate_rows(rows: list[dict], source: str, skip_invalid: bool) -> tuple[list[Row], int]:
    """Keep rows with a question and a parsable `####` answer; else stop with the line number."""

    def convert(row: dict) -> Row | str:
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            return "missing 'question' or 'answer'"
        return answer_problem(row["answer"]) or {
            "question": row["question"],
            "answer": row["answer"],
        }

    return keep_valid(rows, source, skip_invalid, convert)


class GSM8K(GSM8KFormat):
    """GSM8K from `path/{train,test}.jsonl` when `path` is set, else from the hub; the first
    `max_train_samples` / `max_test_samples` rows of each split (None: all 7,473 / 1,319)."""

    def __init__(
        self,
        path: str | None = None,
        hub_id: str = "openai/gsm8k",
        hub_config: str = "main",
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        skip_invalid: bool = False,
        **format_settings: str | None,
    ) -> None:
        raw, sources = load_rows(path, hub_id, hub_config)
        limits = {"train": max_train_samples, "test": max_test_samples}
        splits, skipped = {}, {}
        for split in ("train", "test"):
            rows, skipped[split] = validate_rows(raw[split], sources[split], skip_invalid)
            splits[split] = rows[: limits[split]] if limits[split] is not None else rows
        super().__init__(Splits(splits["train"], splits["test"], skipped), **format_settings)
