"""Held-out evaluation: greedy accuracy, and pass@k / maj@k from sampled completions.

Greedy (one completion per problem), `eval/*`: the means of the task's checks (`Task.check`;
for GSM8K-format tasks `accuracy_strict`, `accuracy_lenient`, `accuracy_anywhere` and the
seed's `avg_math_score`), and `avg_reward`, `avg_response_length` (tokens): the configured
reward and the length, averaged.

Sampled (n = `num_samples` completions per problem at `temperature`), correctness from
`Task.correct`:
- `pass@k`: the chance that at least one of k samples is correct, with the unbiased estimator
  of Chen et al. 2021 (arXiv 2107.03374, eq. 1): 1 - C(n-c, k) / C(n, k) for c correct of n,
  averaged over problems. With n = k it is exact: 1 when any sample is correct. `pass@1` is the
  mean correctness of all samples;
- `maj@k`: the most frequent answer (`Task.answer_of`) among the first k samples is correct
  (self-consistency, Wang et al. 2022, arXiv 2203.11171). Samples without an answer do not
  vote; a tie goes to the answer that came first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch

from grpo.model.loading import Policy
from grpo.rollout.generation import generate, render_prompts
from grpo.tasks.base import Row, Task


def score_completions(
    task: Task,
    rows: list[Row],
    texts: list[str],
    prompts: list[str],
    reward_fn: Callable,
    lengths: list[int],
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """Per completion: its reward, reward parts, length, the task's checks and correctness."""
    answers = [task.answer(row) for row in rows]
    out = reward_fn(texts, answers, prompts, lengths, max_new_tokens)
    return [
        {
            "completion": text,
            "reward": out.total[i],
            "parts": {k: v[i] for k, v in out.parts.items()},
            "length": lengths[i],
            "checks": task.check(text, row),
            "correct": task.correct(text, row),
        }
        for i, (text, row) in enumerate(zip(texts, rows, strict=True))
    ]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct of `n` samples (Chen et al. 2021)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: list[Hashable | None]) -> int | None:
    """The index of the first sample giving the most frequent answer (None answers do not
    vote; ties: the answer seen first); None when no sample gives an answer."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    return answers.index(votes.most_common(1)[0][0])


def sample_metrics(task: Task, samples: list[str], row: Row, k: int) -> dict[str, Any]:
    """One problem's sampled completions scored: per-sample correctness, pass@1, pass@k, maj@k."""
    correct = [task.correct(text, row) for text in samples]
    n, c = len(samples), sum(correct)
    scores = {"pass@1": c / n, f"pass@{k}": pass_at_k(n, c, k)}
    winner = majority_vote([task.answer_of(text) for text in samples[:k]])
    scores[f"maj@{k}"] = float(winner is not None and correct[winner])
    return {"samples": samples, "samples_correct": correct, **scores}


class Evaluator:
    """Evaluates a policy on held-out rows of `task`; built by Hydra from `eval.heldout`.

    Completions follow the task's stop rule and the rollout's `max_prompt_length` and
    `backend`; `max_new_tokens` None is the rollout's budget. Greedy completions score the
    checks; with `num_samples` n > 0, n more per problem are sampled at `temperature` / `top_p`
    for pass@k and maj@k (k <= n).
    """

    def __init__(
        self,
        task: Task,
        rollout: Any,
        max_new_tokens: int | None = None,
        batch_size: int = 32,
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
        self.task = task
        self.max_new_tokens = max_new_tokens or rollout["max_new_tokens"]
        self.max_prompt_length = rollout["max_prompt_length"]
        self.backend = rollout["backend"]
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.k = k
        self.temperature = temperature
        self.top_p = top_p

    def backend_for(self, policy: Policy) -> str:
        """The rollout's backend; but the vLLM engine holds the policy's weights only, so
        another model (the comparison's original) is decoded by the lean decoder."""
        return "lean" if self.backend == "vllm" and policy.engine is None else self.backend

    @torch.no_grad()
    def complete(
        self, policy: Policy, rows: list[Row], n: int = 1, sample: bool = False
    ) -> tuple[list[str], list[int], list[str]]:
        """`n` completions per row (greedy, or sampled at the evaluation temperature).

        Rows are grouped by problem; each `generate` call holds about `batch_size` rows.
        Returns the texts, their lengths in tokens, and the prompt of each.
        """
        policy.model.eval()
        texts: list[str] = []
        lengths: list[int] = []
        prompts: list[str] = []
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(rows), per_call):
            part = render_prompts(
                policy.tokenizer,
                self.task,
                rows[start : start + per_call],
                policy.use_chat_template,
            )
            rollout = generate(
                policy.model,
                policy.tokenizer,
                part,
                n,
                max_new_tokens=self.max_new_tokens,
                max_prompt_length=self.max_prompt_length,
                temperature=self.temperature,
                top_p=self.top_p,
                do_sample=sample,
                stop_pattern=self.task.stop_pattern,
                backend=self.backend_for(policy),
                engine=policy.engine,
            )
            texts += rollout.texts
            lengths += rollout.lengths.tolist()
            prompts += [p for p in part for _ in range(n)]
        return texts, lengths, prompts

    def __call__(
        self, policy: Policy, rows: list[Row], reward_fn: Callable
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Evaluate on `rows`; return `eval/*` metrics and one record per problem."""
        texts, lengths, prompts = self.complete(policy, rows)
        scored = score_completions(
            self.task, rows, texts, prompts, reward_fn, lengths, self.max_new_tokens
        )
        records = [
            {"question": row["question"], "answer": self.task.answer(row), **record}
            for row, record in zip(rows, scored, strict=True)
        ]
        if self.num_samples:
            n = self.num_samples
            samples, _, _ = self.complete(policy, rows, n, sample=True)
            for i, record in enumerate(records):
                record.update(
                    sample_metrics(self.task, samples[i * n : (i + 1) * n], rows[i], self.k)
                )
        return self.metrics(records), records

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Means over problems of the per-problem records, under `eval/*` names."""

        def mean(key: str) -> float:
            return sum(float(r[key]) for r in records) / max(len(records), 1)

        out = {"eval/avg_reward": mean("reward")}
        for key in records[0]["checks"] if records else ():
            out[f"eval/{key}"] = sum(r["checks"][key] for r in records) / len(records)
        out["eval/avg_response_length"] = mean("length")
        if self.num_samples:
            for key in ("pass@1", f"pass@{self.k}", f"maj@{self.k}"):
                out[f"eval/{key}"] = mean(key)
        return out
