"""Competition mathematics (MATH, Hendrycks et al. 2021, arXiv 2103.03874): answers are LaTeX.

Rows hold a `question` (the problem) and an `answer` (the final answer in LaTeX: `\\frac{1}{2}`,
`\\sqrt{3}`, `[0, 1)`, ...). Answers are compared with Hugging Face's `math-verify` (the checker
TRL's accuracy reward uses): both sides are parsed to SymPy and compared as numbers, expressions,
sets or intervals, so `\\frac12`, `0.5` and `1/2` agree. The prompt asks for the final answer in
`\\boxed{}`; generation stops at EOS.

`CompetitionMath` loads from the hub (default `HuggingFaceH4/MATH-500`, fields `problem` and
`answer`) or from a local folder with `train.jsonl` and `test.jsonl`, both through
`datasets.load_dataset`. When train and test come from the same split (MATH-500 has only
`test`), the first `num_test` rows are held out and the rest train.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from grpo.tasks.base import Row, Splits, Task, keep_valid, load_rows
from grpo.tasks.rewards import Completions, Reward

PROMPT = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
# Strict: only an answer in \boxed{...}; lenient: math-verify's default (boxed, then the last
# LaTeX expression, then a plain expression).
BOXED_ONLY = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),)
ANY_ANSWER = (LatexExtractionConfig(), ExprExtractionConfig())


@lru_cache(maxsize=4096)
def gold(answer: str) -> tuple:
    """A ground-truth LaTeX answer parsed once (math-verify wants it in math mode)."""
    return tuple(parse(f"${answer}$", extraction_config=ANY_ANSWER))


def is_correct(completion: str, answer: str, strict: bool = False) -> bool:
    """Whether the completion's final answer equals `answer` (math-verify)."""
    found = parse(completion, extraction_config=BOXED_ONLY if strict else ANY_ANSWER)
    return bool(found) and verify(list(gold(answer)), found)


def scores(completion: str, answer: str) -> dict[str, float]:
    """The held-out checks: the \\boxed{} answer (strict), math-verify's own extraction."""
    return {
        "accuracy_strict": float(is_correct(completion, answer, strict=True)),
        "accuracy_lenient": float(is_correct(completion, answer)),
    }


def parsed_answer(completion: str) -> Hashable | None:
    """The completion's parsed answer as text (what maj@k votes on); None without one."""
    found = parse(completion, extraction_config=ANY_ANSWER)
    return str(found[0]) if found else None


def boxed(answer: str) -> str:
    """A completion that gives `answer` the way the prompt asks."""
    return f"The answer is $\\boxed{{{answer}}}$."


def answer_problem(answer: str) -> str | None:
    """What is wrong with a LaTeX ground truth (math-verify parses no SymPy object out of it);
    None when it is fine."""
    if all(isinstance(part, str) for part in gold(answer)):
        return f"answer {answer!r} is not LaTeX that math-verify can parse"
    return None


class MathVerifyReward(Reward):
    """1 when math-verify finds the completion's answer equal to the LaTeX ground truth, else 0
    (`strict`: only an answer in \\boxed{}). Part: ``correctness``."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        return {
            "correctness": [
                float(is_correct(text, answer, self.strict))
                for text, answer in zip(batch.texts, batch.answers, strict=True)
            ]
        }


def _rows(raw: Sequence[dict], source: str, skip_invalid: bool) -> tuple[list[Row], int]:
    """`question`/`answer` rows from `problem` (or `question`) and `answer` fields; a row
    whose answer math-verify cannot parse stops the run with its line (or is skipped)."""

    def convert(row: dict) -> Row | str:
        question, answer = row.get("problem", row.get("question")), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            return "missing 'problem' (or 'question') or 'answer'"
        return answer_problem(answer) or {"question": question, "answer": answer}

    return keep_valid(raw, source, skip_invalid, convert)


class CompetitionMath(Task):
    """Competition problems with LaTeX answers, checked by math-verify.

    Held-out checks: `accuracy_strict` (the \\boxed{} answer is right), `accuracy_lenient`
    (math-verify's own extraction: boxed, then the last expression). `correct` is lenient;
    maj@k votes on the parsed answer.
    """

    examples = [
        {"question": "What is $\\frac{1}{2} + \\frac{1}{3}$?", "answer": "\\frac{5}{6}"},
        {"question": "Simplify $\\sqrt{12}$.", "answer": "2\\sqrt{3}"},
        {"question": "For which $x$ is $x^2 < x$? Give an interval.", "answer": "(0, 1)"},
    ]

    def __init__(
        self,
        path: str | None = None,
        hub_id: str = "HuggingFaceH4/MATH-500",
        hub_config: str | None = None,
        train_split: str = "test",
        test_split: str = "test",
        num_test: int = 100,
        skip_invalid: bool = False,
        stop_pattern: str | None = None,
        system_prompt: str | None = None,
        template: str = PROMPT,
    ) -> None:
        raw, sources = load_rows(path, hub_id, hub_config)
        if path is not None:  # a folder has both files
            train_split, test_split = "train", "test"
        skipped = {}
        test, skipped["test"] = _rows(raw[test_split], sources[test_split], skip_invalid)
        if train_split == test_split:  # one split: hold out its first num_test rows
            train, test = test[num_test:], test[:num_test]
        else:
            train, skipped["train"] = _rows(raw[train_split], sources[train_split], skip_invalid)
            test = test[:num_test]
        super().__init__(Splits(train, test, skipped), stop_pattern, system_prompt)
        self.template = template

    def prompt(self, row: Row) -> str:
        return self.template.format(question=row["question"])

    def reference_completion(self, row: Row) -> str:
        return boxed(row["answer"])

    def check(self, completion: str, row: Row) -> dict[str, float]:
        return scores(completion, row["answer"])

    def correct(self, completion: str, row: Row) -> bool:
        return is_correct(completion, row["answer"])

    def answer_of(self, completion: str) -> Hashable | None:
        return parsed_answer(completion)
