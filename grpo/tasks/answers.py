"""GSM8K answer extraction, shared by ground-truth solutions and model responses.

GSM8K solutions end with a ``#### N`` line; the prompt asks the model for the same format.
``extract_answer`` reads that number and, unless ``strict``, falls back to looser formats.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import NamedTuple

ANSWER_MARKER = "####"

# One number as written in GSM8K text: optional minus and dollar sign, digits with optional
# thousands commas (only in groups of three), optional decimals. "1,000" and "-$1,234.50" match;
# "1,2" is two numbers. The lookbehind keeps "x2" or "10-3" from yielding "2" or "-3".
_NUMBER = r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_AFTER_HASHES_RE = re.compile(rf"\s*({_NUMBER})")
_ANSWER_PHRASE_RE = re.compile(rf"answer\s*(?:is|:)\s*:?\s*({_NUMBER})", re.IGNORECASE)
_BOXED_RE = re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}")
# The last non-empty line is "#### N", optionally followed by a period.
_FINAL_ANSWER_LINE_RE = re.compile(rf"(?:\A|\n)[ \t]*{ANSWER_MARKER}[ \t]*{_NUMBER}\.?\s*\Z")


class AnswerSource(StrEnum):
    """Which format an answer was read from, in the order ``extract_answer`` tries them."""

    HASHES = "hashes"
    PHRASE = "answer_phrase"
    BOXED = "boxed"
    LAST_NUMBER = "last_number"


class FoundAnswer(NamedTuple):
    """A parsed answer and the format it came from."""

    value: float
    source: AnswerSource


def _number_value(token: str) -> float | None:
    """Convert a token matched by ``_NUMBER`` to a float; None if it overflows to inf."""
    value = float(token.replace("$", "").replace(",", ""))
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    """Parse one number such as ``-$1,234.50.``; None unless ``text`` is exactly one number."""
    match = _NUMBER_RE.fullmatch(text.strip().removesuffix("."))
    return None if match is None else _number_value(match.group())


def _after_last_hashes(text: str) -> float | None:
    """The number right after the last ``####`` (whitespace allowed in between)."""
    start = text.rfind(ANSWER_MARKER)
    if start < 0:
        return None
    match = _AFTER_HASHES_RE.match(text, start + len(ANSWER_MARKER))
    return None if match is None else _number_value(match.group(1))


def _last_match_value(pattern: re.Pattern[str], text: str) -> float | None:
    """The number from the last match of ``pattern`` (its one group, or the whole match)."""
    matches = pattern.findall(text)
    return _number_value(matches[-1]) if matches else None


# Fallbacks in the order they are tried: "the answer is N" / "answer: N" (case-insensitive),
# \boxed{N}, then any number. The last match of each wins.
_FALLBACKS = (
    (AnswerSource.PHRASE, _ANSWER_PHRASE_RE),
    (AnswerSource.BOXED, _BOXED_RE),
    (AnswerSource.LAST_NUMBER, _NUMBER_RE),
)


def find_answer(text: str, strict: bool = False) -> FoundAnswer | None:
    """Find the answer in ``text`` and the format it was written in.

    Tries the number after the last ``####``; if ``strict``, stops there. Otherwise falls back,
    in order, to "the answer is N" / "answer: N", ``\\boxed{N}``, and the last number.
    """
    value = _after_last_hashes(text)
    if value is not None:
        return FoundAnswer(value, AnswerSource.HASHES)
    if strict:
        return None
    for source, pattern in _FALLBACKS:
        value = _last_match_value(pattern, text)
        if value is not None:
            return FoundAnswer(value, source)
    return None


def extract_answer(text: str, strict: bool = False) -> float | None:
    """The numeric answer in ``text`` (see ``find_answer``), or None when there is none."""
    found = find_answer(text, strict)
    return None if found is None else found.value


def answers_match(predicted: float | None, truth: float | None, tol: float = 1e-6) -> bool:
    """Whether two extracted answers are numerically equal; None never matches."""
    if predicted is None or truth is None:
        return False
    return math.isclose(predicted, truth, rel_tol=tol, abs_tol=tol)


def ends_at_answer_line(text: str) -> bool:
    """Whether the last non-empty line is ``#### N`` (only whitespace or a period after N)."""
    return _FINAL_ANSWER_LINE_RE.search(text) is not None
