"""Held-out evaluation: greedy accuracy, and pass@k / maj@k from sampled completions.

Greedy (one completion per problem), `eval/*`: the means of the task's checks (`Task.check`;
for GSM8K-format tasks `accuracy_strict`, `accuracy_lenient`, `accuracy_anywhere` and the
seed's `avg_math_score`), and `avg_reward`, `avg_response_length` (tokens): the configured
reward and the length, averaged.

With a multi-turn environment (the held-out completions go through the same rollout source, so
with its tool), the greedy trajectories' stats too: `env/turns` and each `Episode.stats()` key
as `eval/env/<name>` means, and where the episodes count tool calls `eval/env/used_tool` (the
fraction that called the tool) and `eval/accuracy_with_tool` / `eval/accuracy_without_tool`
(`Task.correct` among the trajectories that did / did not; NaN when there are none).

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
from collections.abc import Hashable
from typing import Any

import torch

from grpo import distributed
from grpo.batch import ScoredRollout
from grpo.environments.base import stat_means, used_tool
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource
from grpo.tasks.base import Row, Task


def completion_records(task: Task, scored: ScoredRollout) -> list[dict[str, Any]]:
    """Per completion: its text, reward, reward parts, length, the task's checks and
    correctness; a multi-turn trajectory's stats (`env`)."""
    scores, lengths = scored.scores, scored.rollout.lengths.tolist()
    records = [
        {
            "completion": text,
            "reward": scores.total[i],
            "parts": {k: v[i] for k, v in scores.parts.items()},
            "length": lengths[i],
            "checks": task.check(text, row),
            "correct": task.correct(text, row),
        }
        for i, (text, row) in enumerate(zip(scored.rollout.texts, scored.rows, strict=True))
    ]
    for i, record in enumerate(records if scored.stats else ()):
        record["env"] = scored.row_stats(i)
    return records


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
    """Evaluates the source's policy on held-out rows; built by Hydra from `eval.heldout`.

    Completions come from `source` (the training rollout's prompts, stop rule, backend and
    reward) with `sampling`'s prompt length: greedy ones score the checks; with `num_samples`
    n > 0, n more per problem are sampled at `temperature` / `top_p` for pass@k and maj@k
    (k <= n). `max_new_tokens` None is the rollout's budget. With several processes each rank
    completes every N-th problem and the records are gathered, so the metrics are one
    process's; where several ranks drive one engine (`Backend.ranks_per_engine`), the shorter
    shares complete one more problem, unrecorded, so those ranks generate equally often.
    """

    def __init__(
        self,
        source: RolloutSource,
        sampling: SamplingSettings,
        max_new_tokens: int | None = None,
        batch_size: int = 32,
        num_samples: int = 0,
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        self.source, self.task = source, source.task
        self.greedy = sampling.greedy(max_new_tokens)
        self.sampled = sampling.sampled(temperature, top_p, max_new_tokens)
        self.batch_size, self.num_samples, self.k = batch_size, num_samples, k

    @torch.no_grad()
    def complete(
        self, rows: list[Row], n: int, settings: SamplingSettings
    ) -> list[list[dict[str, Any]]]:
        """`n` completions per row, scored (`completion_records`), in calls of about
        `batch_size` completions; one list of n records per row."""
        records: list[dict[str, Any]] = []
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(rows), per_call):
            scored = self.source(rows[start : start + per_call], n, settings)
            records += completion_records(self.task, scored)
        return [records[i * n : (i + 1) * n] for i in range(len(rows))]

    def __call__(self, rows: list[Row]) -> dict[str, float]:
        """`eval/*` metrics on `rows`, split over the ranks (see the class docstring)."""
        world = distributed.world_size()
        mine, extra = rows[distributed.rank() :: world], []
        if self.source.backend.ranks_per_engine > 1:  # keep the engine's ranks in step
            extra = rows[: -(-len(rows) // world) - len(mine)]  # equal shares; records dropped
        records = self.records(mine + extra)[: len(mine)] if mine or extra else []
        if world > 1:
            records = [record for part in distributed.all_gather(records) for record in part]
        return self.metrics(records)

    def records(self, rows: list[Row]) -> list[dict[str, Any]]:
        """One record per problem: its greedy completion scored, and with `num_samples` its
        samples' pass@k and maj@k."""
        greedy = self.complete(rows, 1, self.greedy)
        records = [
            {"question": row["question"], "answer": self.task.answer(row), **done[0]}
            for row, done in zip(rows, greedy, strict=True)
        ]
        if self.num_samples:
            samples = self.complete(rows, self.num_samples, self.sampled)
            for record, row, done in zip(records, rows, samples, strict=True):
                texts = [r["completion"] for r in done]
                record.update(sample_metrics(self.task, texts, row, self.k))
        return records

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
        if records and "env" in records[0]:
            out.update(environment_metrics(records))
        return out


def environment_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """The greedy trajectories' stat means (`eval/env/*`) and, where the episodes count tool
    calls, accuracy with and without the tool (NaN for a side no trajectory is on)."""
    stats = {name: [r["env"][name] for r in records] for name in records[0]["env"]}
    out = {f"eval/env/{name}": value for name, value in stat_means(stats).items()}
    used = used_tool(stats)
    if used is not None:
        for side, label in ((True, "with"), (False, "without")):
            right = [float(r["correct"]) for r, u in zip(records, used, strict=True) if u == side]
            out[f"eval/accuracy_{label}_tool"] = sum(right) / len(right) if right else math.nan
    return out
