"""Held-out evaluation: greedy accuracy, and pass@k / maj@k from sampled completions.

Greedy (one completion per problem), `eval/*`:
- `accuracy_strict`: the number after `####` equals the reference answer;
- `accuracy_lenient`: the extracted answer (with fallbacks: "the answer is", boxed, last number)
  equals it;
- `accuracy_anywhere`: the reference number appears anywhere in the completion;
- `avg_math_score`: the seed's name for the score of the math itself, defined here as the
  lenient accuracy (1 per correct final answer, whatever the format), so it is comparable
  across rewards;
- `avg_reward`, `avg_response_length` (tokens): the configured reward and length, averaged.

Sampled (n = `num_samples` completions per problem at `temperature`), correctness lenient:
- `pass@k`: the chance that at least one of k samples is correct, with the unbiased estimator
  of Chen et al. 2021 (arXiv 2107.03374, eq. 1): 1 - C(n-c, k) / C(n, k) for c correct of n,
  averaged over problems. With n = k it is exact: 1 when any sample is correct. `pass@1` is the
  mean correctness of all samples;
- `maj@k`: the most frequent answer among the first k samples is correct (self-consistency,
  Wang et al. 2022, arXiv 2203.11171). Samples without an answer do not vote; a tie goes to the
  answer that came first.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from grpo.answer import answers_match, extract_answer, parse_number
from grpo.modeling import Policy
from grpo.rollout import generate, render_prompts

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_anywhere(text: str, truth: float | None) -> bool:
    """True when any number written in `text` equals `truth`."""
    return any(answers_match(parse_number(m), truth) for m in NUMBER.findall(text))


def score_completions(
    texts: list[str], answers: list[str], reward_fn: Callable, lengths: list[int]
) -> list[dict[str, Any]]:
    """Per completion: its reward, reward parts, and the three correctness checks."""
    out = reward_fn(texts, answers, lengths)
    records = []
    for i, (text, answer) in enumerate(zip(texts, answers, strict=True)):
        truth = extract_answer(answer, strict=True)
        records.append(
            {
                "completion": text,
                "reward": out.total[i],
                "parts": {k: v[i] for k, v in out.parts.items()},
                "strict": answers_match(extract_answer(text, strict=True), truth),
                "lenient": answers_match(extract_answer(text), truth),
                "anywhere": answer_anywhere(text, truth),
                "length": lengths[i],
            }
        )
    return records


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct of `n` samples (Chen et al. 2021)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: list[float | None]) -> float | None:
    """The most frequent extracted answer (None answers do not vote; ties: first seen)."""
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def sample_metrics(samples: list[str], answer: str, k: int) -> dict[str, Any]:
    """One problem's sampled completions scored: per-sample correctness, pass@1, pass@k, maj@k."""
    truth = extract_answer(answer, strict=True)
    predicted = [extract_answer(text) for text in samples]
    correct = [answers_match(p, truth) for p in predicted]
    n, c = len(samples), sum(correct)
    scores = {"pass@1": c / n, f"pass@{k}": pass_at_k(n, c, k)}
    scores[f"maj@{k}"] = float(answers_match(majority_vote(predicted[:k]), truth))
    return {"samples": samples, "samples_correct": correct, **scores}


class Evaluator:
    """Evaluates a policy on held-out rows; built by Hydra from `conf/eval/default.yaml`."""

    def __init__(
        self,
        max_new_tokens: int,
        batch_size: int = 32,
        max_prompt_length: int = 256,
        stop_pattern: str | None = None,
        num_samples: int = 0,
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"eval.heldout.batch_size must be >= 1, got {batch_size}")
        if num_samples < 0:
            raise ValueError(f"eval.heldout.num_samples must be >= 0, got {num_samples}")
        if num_samples and not 1 <= k <= num_samples:
            raise ValueError(
                f"eval.heldout.k={k}: pass@k and maj@k need 1 <= k <= num_samples={num_samples}"
            )
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.stop_pattern = stop_pattern
        self.num_samples = num_samples
        self.k = k
        self.temperature = temperature
        self.top_p = top_p

    @torch.no_grad()
    def complete(
        self, policy: Policy, questions: list[str], n: int = 1, sample: bool = False
    ) -> tuple[list[str], list[int]]:
        """`n` completions per question (greedy, or sampled at the evaluation temperature).

        Rows are grouped by question; each `generate` call holds about `batch_size` rows.
        Returns the texts and their lengths in tokens.
        """
        policy.model.eval()
        texts: list[str] = []
        lengths: list[int] = []
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(questions), per_call):
            prompts = render_prompts(
                policy.tokenizer, questions[start : start + per_call], policy.use_chat_template
            )
            rollout = generate(
                policy.model,
                policy.tokenizer,
                prompts,
                n,
                max_new_tokens=self.max_new_tokens,
                max_prompt_length=self.max_prompt_length,
                temperature=self.temperature,
                top_p=self.top_p,
                do_sample=sample,
                stop_pattern=self.stop_pattern,
            )
            texts += rollout.texts
            lengths += rollout.lengths.tolist()
        return texts, lengths

    def __call__(
        self, policy: Policy, rows: list[dict[str, str]], reward_fn: Callable
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Evaluate on `rows`; return `eval/*` metrics and one record per problem."""
        questions, answers = [r["question"] for r in rows], [r["answer"] for r in rows]
        texts, lengths = self.complete(policy, questions)
        records = [
            {"question": q, "answer": a, **scored}
            for q, a, scored in zip(
                questions,
                answers,
                score_completions(texts, answers, reward_fn, lengths),
                strict=True,
            )
        ]
        if self.num_samples:
            n = self.num_samples
            samples, _ = self.complete(policy, questions, n, sample=True)
            for i, record in enumerate(records):
                record.update(sample_metrics(samples[i * n : (i + 1) * n], answers[i], self.k))
        return self.metrics(records), records

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Means over problems of the per-problem records, under `eval/*` names."""

        def mean(key: str) -> float:
            return sum(float(r[key]) for r in records) / max(len(records), 1)

        out = {
            "eval/avg_reward": mean("reward"),
            "eval/avg_math_score": mean("lenient"),
            "eval/accuracy_strict": mean("strict"),
            "eval/accuracy_lenient": mean("lenient"),
            "eval/accuracy_anywhere": mean("anywhere"),
            "eval/avg_response_length": mean("length"),
        }
        if self.num_samples:
            for key in ("pass@1", f"pass@{self.k}", f"maj@{self.k}"):
                out[f"eval/{key}"] = mean(key)
        return out
