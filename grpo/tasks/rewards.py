"""Rewards: completions and ground-truth answers in, one number per completion out.

Every reward is called as ``reward(completions, answers, prompts=..., lengths=...,
max_new_tokens=..., columns=...)`` and returns a ``RewardOutput``: the ``total`` per completion
and its ``parts`` (name -> one value per completion), which always sum to the total, so the
parts can be logged as its breakdown. A subclass implements ``parts(batch)`` on a
``Completions`` batch, which also carries the prompts, the completion lengths in tokens, the
generation budget and each completion's row columns. The rewards here read GSM8K-format answers
(``#### N``, or a bare number) with the same ``extract_answer`` as the completions; other tasks
bring their own (``grpo.tasks.competition_math``). Constructor arguments are plain numbers and
strings so Hydra can build each reward from its ``_target_``. ``FunctionReward`` makes a reward
of a plain function (TRL's convention), named by its dotted path.
"""

from __future__ import annotations

import inspect
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpo.batch import RewardOutput
from grpo.registry import import_function
from grpo.tasks.answers import (
    ANSWER_MARKER,
    AnswerSource,
    answers_match,
    ends_at_answer_line,
    extract_answer,
    find_answer,
)

_ERROR_TEXT_CHARS = 200


class RewardError(ValueError):
    """A reward function failed; the message names the reward and the sample."""


@dataclass
class Completions:
    """What a reward may read: completions, their answers and prompts, lengths, the budget,
    and the other columns of each completion's row."""

    texts: Sequence[str]
    answers: Sequence[str]
    prompts: Sequence[str] | None = None  # the prompt text of each completion
    lengths: Sequence[int] | None = None  # completion lengths in tokens
    max_new_tokens: int | None = None  # the generation budget in tokens
    columns: Sequence[Mapping[str, Any]] | None = None  # each row's other columns (Task.columns)

    def __post_init__(self) -> None:
        n = len(self.texts)
        for name in ("answers", "prompts", "lengths", "columns"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{n} completions but {len(values)} {name}")

    def one(self, i: int) -> Completions:
        """Completion `i` alone."""

        def pick(values: Sequence | None) -> Sequence | None:
            return None if values is None else values[i : i + 1]

        return Completions(
            self.texts[i : i + 1],
            self.answers[i : i + 1],
            pick(self.prompts),
            pick(self.lengths),
            self.max_new_tokens,
            pick(self.columns),
        )


class Reward(ABC):
    """Base class: subclasses compute named parts; the total is their sum, checked finite."""

    def __call__(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        prompts: Sequence[str] | None = None,
        lengths: Sequence[int] | None = None,
        max_new_tokens: int | None = None,
        columns: Sequence[Mapping[str, Any]] | None = None,
    ) -> RewardOutput:
        """Score each completion against its ground-truth answer."""
        batch = Completions(completions, answers, prompts, lengths, max_new_tokens, columns)
        try:
            parts = self.parts(batch)
        except Exception as error:
            raise RewardError(self._describe_failure(batch, error)) from error
        total = [sum(values) for values in zip(*parts.values(), strict=True)]
        self._check_finite(total, completions)
        return RewardOutput(total=total, parts=parts)

    @abstractmethod
    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """The named parts of the reward, one value per completion each."""

    def _describe_failure(self, batch: Completions, error: Exception) -> str:
        """Name this reward, the error, and the first sample that fails on its own."""
        message = f"{type(self).__name__} failed: {error}"
        for index in range(len(batch.texts)):
            try:
                self.parts(batch.one(index))
            except Exception:
                text, answer = batch.texts[index], batch.answers[index]
                return (
                    f"{message}; on completion {index} {text[:_ERROR_TEXT_CHARS]!r} "
                    f"with answer {answer[:_ERROR_TEXT_CHARS]!r}"
                )
        return message

    def _check_finite(self, total: list[float], completions: Sequence[str]) -> None:
        """Raise ValueError naming this reward and the completion whose total is not finite."""
        for index, (value, text) in enumerate(zip(total, completions, strict=True)):
            if not math.isfinite(value):
                raise ValueError(
                    f"{type(self).__name__} gave non-finite reward {value} for completion "
                    f"{index}: {text[:_ERROR_TEXT_CHARS]!r}"
                )


def _ground_truths(answers: Sequence[str]) -> list[float]:
    """Extract the ground-truth numbers; ValueError if one has none (a data bug, not a miss)."""
    truths = [extract_answer(answer) for answer in answers]
    for index, truth in enumerate(truths):
        if truth is None:
            raise ValueError(f"no number in ground-truth answer {index}: {answers[index]!r}")
    return truths


def _bonus(condition: object, weight: float) -> float:
    """``weight`` when ``condition`` is truthy, else 0."""
    return weight if condition else 0.0


# Mathematical indicators for HybridReward, each counted once when present anywhere.
_UNITS = (
    "dollars?|cents?|hours?|minutes?|seconds?|days?|weeks?|months?|years?|"
    "miles?|km|meters?|feet|foot|inches|inch|pounds?|kg|grams?|liters?|gallons?"
)
MATH_INDICATORS: dict[str, re.Pattern[str]] = {
    "operator": re.compile(r"\d\s*[-+*/×÷]\s*\d"),  # arithmetic between two numbers: 3 * 4
    "equals": re.compile(r"="),  # an equals sign
    "money": re.compile(r"\$\s*\d"),  # a dollar amount: $12
    "percent": re.compile(r"\d\s*%"),  # a percentage: 20%
    "decimal_or_fraction": re.compile(r"\d[./]\d"),  # 0.5 or 1/2
    "unit": re.compile(rf"\d\s*(?:{_UNITS})\b", re.IGNORECASE),  # a number with a unit: 5 hours
}
# Structured-thinking words for HybridReward's reasoning part (whole words, any case).
_REASONING_WORDS = re.compile(
    r"\b(?:first|second|next|then|finally|therefore|thus|so|because|step)\b", re.IGNORECASE
)
_ANY_NUMBER = re.compile(r"\d")
# Calculation evidence: an equation with an operator such as "48 / 2 = 24" (GSM8K also writes
# "0.2 x 50 = 10"), or a GSM8K calculator annotation "<<48/2=24>>".
_OPERAND = r"\$?\d[\d,.]*"
_EQUATION = re.compile(rf"{_OPERAND}(?:\s*[-+*/×÷x]\s*{_OPERAND})+\s*=\s*-?{_OPERAND}")
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


class HybridReward(Reward):
    """The seed's hybrid reward: partial credit for correctness plus reasoning-style heuristics.

    Parts (each weight is a constructor argument; defaults are the seed's):

    - ``correctness``: ``correct`` (0.6) when the extracted answer (non-strict
      ``extract_answer``) equals the ground truth, ``wrong`` (0.2) when an answer was extracted but
      differs, ``no_answer`` (0.3, the seed's quality fallback) when nothing could be extracted.
    - ``length``: ``length_bonus`` (0.2) when the completion is longer than ``min_chars`` (50).
    - ``math_indicators``: ``per_math_indicator`` (0.1) for each indicator in
      ``MATH_INDICATORS`` that appears at least once (operator between numbers, ``=``, ``$N``,
      ``N%``, decimal or fraction, number with a unit), capped at ``max_math_indicators`` (0.5).
    - ``reasoning``: ``reasoning`` (0.3) when a structured-thinking word appears (first, second,
      next, then, finally, therefore, thus, so, because, step).
    - ``format``: ``hashes_format`` (0.15) when the answer was read from a ``#### N`` line,
      else ``other_format`` (0.1) when read from "the answer is N" / "answer: N" or ``\\boxed{N}``.
    - ``numerical``: ``numerical`` (0.1) when the completion contains any digit.
    - ``calculation``: ``calculation`` (0.1) when it contains an equation with an operator
      (``a + b = c``) or a calculator annotation ``<<...>>``.
    """

    def __init__(
        self,
        correct: float = 0.6,
        wrong: float = 0.2,
        no_answer: float = 0.3,
        length_bonus: float = 0.2,
        min_chars: int = 50,
        per_math_indicator: float = 0.1,
        max_math_indicators: float = 0.5,
        reasoning: float = 0.3,
        hashes_format: float = 0.15,
        other_format: float = 0.1,
        numerical: float = 0.1,
        calculation: float = 0.1,
    ) -> None:
        self.correct = correct
        self.wrong = wrong
        self.no_answer = no_answer
        self.length_bonus = length_bonus
        self.min_chars = min_chars
        self.per_math_indicator = per_math_indicator
        self.max_math_indicators = max_math_indicators
        self.reasoning = reasoning
        self.hashes_format = hashes_format
        self.other_format = other_format
        self.numerical = numerical
        self.calculation = calculation

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """All seven parts (the length part counts characters, not tokens)."""
        completions = batch.texts
        truths = _ground_truths(batch.answers)
        correctness = [
            self._correctness(text, truth) for text, truth in zip(completions, truths, strict=True)
        ]
        text_parts = {
            "length": self._length,
            "math_indicators": self._math_indicators,
            "reasoning": self._reasoning,
            "format": self._format,
            "numerical": self._numerical,
            "calculation": self._calculation,
        }
        by_text = {name: [score(t) for t in completions] for name, score in text_parts.items()}
        return {"correctness": correctness} | by_text

    def _correctness(self, text: str, truth: float) -> float:
        predicted = extract_answer(text)
        if predicted is None:
            return self.no_answer
        return self.correct if answers_match(predicted, truth) else self.wrong

    def _length(self, text: str) -> float:
        return _bonus(len(text) > self.min_chars, self.length_bonus)

    def _math_indicators(self, text: str) -> float:
        found = sum(1 for pattern in MATH_INDICATORS.values() if pattern.search(text))
        return min(found * self.per_math_indicator, self.max_math_indicators)

    def _reasoning(self, text: str) -> float:
        return _bonus(_REASONING_WORDS.search(text), self.reasoning)

    def _numerical(self, text: str) -> float:
        return _bonus(_ANY_NUMBER.search(text), self.numerical)

    def _format(self, text: str) -> float:
        found = find_answer(text)
        weights = {
            AnswerSource.HASHES: self.hashes_format,
            AnswerSource.PHRASE: self.other_format,
            AnswerSource.BOXED: self.other_format,
        }
        return 0.0 if found is None else weights.get(found.source, 0.0)

    def _calculation(self, text: str) -> float:
        evidence = _EQUATION.search(text) or _CALCULATOR_ANNOTATION.search(text)
        return _bonus(evidence, self.calculation)


class CorrectnessReward(Reward):
    """Binary accuracy reward (DeepSeek-R1): 1 when the extracted answer is right, else 0.

    ``strict`` reads only the ``#### N`` answer; otherwise ``extract_answer``'s fallbacks apply.
    Part: ``correctness``.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """The ``correctness`` part: 1.0 or 0.0 per completion."""
        truths = _ground_truths(batch.answers)
        return {
            "correctness": [
                float(answers_match(extract_answer(text, self.strict), truth))
                for text, truth in zip(batch.texts, truths, strict=True)
            ]
        }


class FinalAnswerFormatReward(Reward):
    """Format reward that repetition cannot game: ``weight`` only for one final ``#### N`` line.

    Pays when the completion contains exactly one ``####`` and its last non-empty line is
    ``#### N`` (``ends_at_answer_line``); repeated answer lines or text after the answer earn 0.
    Part: ``format``.
    """

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = weight

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """The ``format`` part: ``weight`` or 0.0 per completion."""
        return {"format": [self._score(text) for text in batch.texts]}

    def _score(self, text: str) -> float:
        well_formed = text.count(ANSWER_MARKER) == 1 and ends_at_answer_line(text)
        return self.weight if well_formed else 0.0


class SoftOverlongPunishment(Reward):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), on token counts |y|.

    0 when |y| <= L_max - cache_length; ((L_max - cache_length) - |y|) / cache_length inside
    the buffer, falling linearly from 0 to -1 at |y| = L_max; -1 beyond L_max. L_max is
    `max_length`, or (None) the generation budget the batch carries. Needs the lengths.
    Part: ``overlong``.
    """

    def __init__(self, cache_length: int, max_length: int | None = None) -> None:
        if not 0 < cache_length <= (max_length or cache_length):
            raise ValueError(
                f"need 0 < cache_length <= max_length, got {cache_length=} {max_length=}"
            )
        self.max_length = max_length
        self.cache_length = cache_length

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """The ``overlong`` part: a penalty in [-1, 0] per completion."""
        if batch.lengths is None:
            raise ValueError(f"{type(self).__name__} needs the completion lengths (tokens)")
        max_length = self.max_length or batch.max_new_tokens
        if max_length is None or not self.cache_length <= max_length:
            raise ValueError(
                f"{type(self).__name__}: cache_length {self.cache_length} needs a max_length "
                f"at least as large (got {max_length})"
            )
        return {"overlong": [self.penalty(n, max_length) for n in batch.lengths]}

    def penalty(self, length: int, max_length: int) -> float:
        """Eq. 13 for one completion of ``length`` tokens."""
        expected = max_length - self.cache_length
        if length <= expected:
            return 0.0
        if length <= max_length:
            return (expected - length) / self.cache_length
        return -1.0


class CombinedReward(Reward):
    """Weighted sum of named reward components: total = sum of weight * component total.

    Parts are the components' parts times their weight, named ``component/part``, or just
    ``component`` when that component has a single part (so they still sum to the total).
    ``weights`` defaults to 1.0 for every component; a weight for an unknown component is an error.
    """

    def __init__(
        self, components: Mapping[str, Reward], weights: Mapping[str, float] | None = None
    ) -> None:
        if not components:
            raise ValueError("CombinedReward needs at least one component")
        weights = dict(weights or {})
        unknown = set(weights) - set(components)
        if unknown:
            raise ValueError(f"weights for unknown reward components: {sorted(unknown)}")
        self.components = dict(components)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.components}

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """Every component's weighted parts, named by component."""
        parts: dict[str, list[float]] = {}
        for name, component in self.components.items():
            output = component(
                batch.texts,
                batch.answers,
                batch.prompts,
                batch.lengths,
                batch.max_new_tokens,
                batch.columns,
            )
            weight = self.weights[name]
            single = len(output.parts) == 1
            for part, values in output.parts.items():
                key = name if single else f"{name}/{part}"
                parts[key] = [weight * value for value in values]
        return parts


class FunctionReward(Reward):
    """A plain function as a reward, named by its dotted path `function` (TRL's convention).

    The function is called with keyword arguments and returns one number per completion::

        function(completions=..., answers=..., prompts=..., **columns) -> list[float]

    ``completions``: the completion texts; ``answers``: each one's ground truth
    (``task.answer(row)``); ``prompts``: each one's prompt as the model saw it (chat template
    included; None in a direct call without them); ``columns``: the other columns of each
    completion's row, one list per column (``task=dataset``'s rows; none for the other tasks).
    Completion i of every list belongs together; a prompt's G completions are consecutive.
    Arguments the function does not name are left out unless it takes ``**kwargs``. Part:
    ``name``, by default the function's own name.
    """

    ARGUMENTS = ("completions", "answers", "prompts")

    def __init__(self, function: str, name: str | None = None) -> None:
        self.path = str(function)
        self.function = import_function(self.path, "function")
        self.name = name or self.function.__name__
        params = inspect.signature(self.function).parameters.values()
        by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self.named = {p.name for p in params if p.kind in by_name}
        self.required = [p.name for p in params if p.kind in by_name and p.default is p.empty]

    def parts(self, batch: Completions) -> dict[str, list[float]]:
        """The function's values as the part ``name``."""
        prompts = None if batch.prompts is None else list(batch.prompts)
        given = {"completions": list(batch.texts), "answers": list(batch.answers)}
        given["prompts"] = prompts
        columns = by_column(batch.columns)
        clash = sorted(set(columns) & set(given))
        if clash:
            raise ValueError(f"{self.path}: the rows' column {clash[0]!r} hides an argument")
        given |= columns
        missing = [name for name in self.required if name not in given]
        if missing:
            raise ValueError(
                f"{self.path} needs {', '.join(missing)}: neither an argument nor a column of "
                f"the rows (columns: {', '.join(columns) or 'none'})"
            )
        if not self.takes_any:
            given = {k: v for k, v in given.items() if k in self.named}
        values = self.function(**given)
        sized = hasattr(values, "__len__") and not isinstance(values, str | bytes)
        if not sized or len(values) != len(batch.texts):
            raise ValueError(
                f"{self.path} returned {values!r:.80}, not one number per completion "
                f"({len(batch.texts)})"
            )
        return {self.name: [self._number(value, i) for i, value in enumerate(values)]}

    def _number(self, value: Any, index: int) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.path} returned {value!r:.80} for completion {index}: not a number"
            ) from None


def by_column(rows: Sequence[Mapping[str, Any]] | None) -> dict[str, list[Any]]:
    """Per-row columns as one list per column (the first row's columns)."""
    if not rows:
        return {}
    return {name: [row.get(name) for row in rows] for name in rows[0]}


def exact_match(completions: Sequence[str], answers: Sequence[str], **columns: Any) -> list[float]:
    """1.0 where a completion, stripped of surrounding whitespace, is its answer, else 0.0: a
    plain reward function (`conf/reward/function.yaml`'s example)."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers, strict=True)]
