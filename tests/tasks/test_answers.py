"""Answer extraction: every GSM8K ground truth, plus a table of tricky model responses."""

from __future__ import annotations

import json

import pytest

from grpo.tasks.answers import (
    AnswerSource,
    answers_match,
    ends_at_answer_line,
    extract_answer,
    find_answer,
    parse_number,
)

GSM8K_ROWS = 7_473 + 1_319


def _reference_answer(solution: str) -> float:
    """The ``####`` number parsed independently: text after the last ``####``, commas removed."""
    return float(solution.split("####")[-1].strip().replace(",", ""))


def test_every_gsm8k_answer_is_extracted(gsm8k_dir) -> None:
    solutions = [
        json.loads(line)["answer"]
        for split in ("train", "test")
        for line in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()
    ]
    assert len(solutions) == GSM8K_ROWS
    for solution in solutions:
        expected = _reference_answer(solution)
        assert extract_answer(solution) == expected, solution
        assert extract_answer(solution, strict=True) == expected, solution


@pytest.mark.parametrize(
    ("text", "strict", "expected"),
    [
        ("So the total is 72.\n#### 72", False, 72.0),
        ("#### 1,000", False, 1000.0),
        ("#### 1,234,567", True, 1234567.0),
        ("#### $1,234.50.", True, 1234.5),
        ("####   -5", True, -5.0),
        ("#### -$3.25", True, -3.25),
        ("####7", True, 7.0),
        ("#### 0.5.", True, 0.5),
        ("#### 18 dollars", True, 18.0),
        ("#### 3\nOops, retry.\n#### 4", True, 4.0),
        ("#### 3\n#### 4.\n", True, 4.0),
        ("#### 9\nThe answer is 5", False, 9.0),
        ("The answer is 42.", False, 42.0),
        ("The final answer is $1,050.", False, 1050.0),
        ("ANSWER: -12", False, -12.0),
        ("answer is 1, then 2. The answer is 3", False, 3.0),
        ("We get \\boxed{7} apples", False, 7.0),
        ("\\boxed{ 2,500 }", False, 2500.0),
        ("First 3 + 4 = 7, then 7 * 2 = 14 apples.", False, 14.0),
        ("She pays 10-3 dollars", False, 3.0),
        ("version v2", False, None),
        ("I do not know.", False, None),
        ("", False, None),
        ("The answer is 42.", True, None),
        ("\\boxed{7}", True, None),
        ("#### [number]", True, None),
        ("#### [number]\nso it is 5", False, 5.0),
        ("1" * 400, False, None),
    ],
)
def test_extract_answer(text: str, strict: bool, expected: float | None) -> None:
    assert extract_answer(text, strict=strict) == expected


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("#### 4", AnswerSource.HASHES),
        ("The answer is 4", AnswerSource.PHRASE),
        ("\\boxed{4}", AnswerSource.BOXED),
        ("maybe 4", AnswerSource.LAST_NUMBER),
    ],
)
def test_find_answer_reports_source(text: str, source: AnswerSource) -> None:
    assert find_answer(text) == (4.0, source)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", 1000.0),
        (" -$1,234.50. ", -1234.5),
        ("3.", 3.0),
        ("1,2", None),
        ("12 apples", None),
        ("nan", None),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("predicted", "truth", "expected"),
    [
        (extract_answer("#### 1,000"), 1000.0, True),
        (72.0, 72.0, True),
        (0.1 + 0.2, 0.3, True),
        (72.0, 73.0, False),
        (1000.0, 1000.01, False),
        (None, 5.0, False),
        (5.0, None, False),
        (None, None, False),
    ],
)
def test_answers_match(predicted: float | None, truth: float | None, expected: bool) -> None:
    assert answers_match(predicted, truth) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n#### 7", True),
        ("#### 7.\n\n  \n", True),
        ("  #### $1,000  ", True),
        ("3 + 4 = 7 #### 7", False),
        ("#### 7\nDone.", False),
        ("#### 7 apples", False),
        ("#### [number]", False),
        ("The answer is 7", False),
        ("", False),
    ],
)
def test_ends_at_answer_line(text: str, expected: bool) -> None:
    assert ends_at_answer_line(text) is expected
