"""Model comparison (the seed's `test_model_comparison`): the original model against the trained
one on the same prompts, `num_responses_per_prompt` sampled responses each, scored by the run's
reward. The original is the base with LoRA adapters switched off, or for full fine-tuning the
starting checkpoint loaded again.

`comparison.json` in the run folder:

    problems: one per prompt, side by side:
        question, ground_truth,
        original / trained: responses (completion, reward, parts, strict, lenient, anywhere,
                            length), avg_score (mean reward), accuracy (lenient),
        improvement: trained avg_score - original avg_score
    comparison_stats:
        num_problems, num_responses_per_prompt,
        original_avg_score, trained_avg_score (mean reward over all responses),
        improvement = trained_avg_score - original_avg_score (always given),
        improvement_percentage = 100 * improvement / |original_avg_score|, only where that
            baseline makes a relative change meaningful: |original| >= a tenth of the larger
            of |original| and |trained| (else null: from 0.006 to 0.3 is not "+4950%"),
        original_accuracy, trained_accuracy (`Task.correct` over all responses)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from grpo.evaluation.heldout import Evaluator
from grpo.model.loading import Policy
from grpo.tasks.base import Row, Task

# A relative change is shown only from a baseline at least this fraction of the larger value.
MEANINGFUL_BASELINE = 0.1


def comparison_problems(prompts: list[Row], heldout: list[Row], num_heldout: int) -> list[Row]:
    """The fixed prompts followed by the first `num_heldout` held-out problems."""
    return [dict(p) for p in prompts] + list(heldout[:num_heldout])


def relative_change(before: float, after: float) -> float | None:
    """100 * (after - before) / |before|, or None when `before` is too small a baseline for a
    percentage to mean anything (below MEANINGFUL_BASELINE of the larger magnitude, or 0)."""
    base = abs(before)
    if base == 0 or base < MEANINGFUL_BASELINE * max(base, abs(after)):
        return None
    return 100 * (after - before) / base


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _side(responses: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "responses": responses,
        "avg_score": _mean([r["reward"] for r in responses]),
        "accuracy": _mean([float(r["correct"]) for r in responses]),
    }


def comparison_result(
    task: Task,
    problems: list[Row],
    original: list[list[dict[str, Any]]],
    trained: list[list[dict[str, Any]]],
) -> dict[str, Any]:
    """Per-problem responses side by side and `comparison_stats` (see the module docstring)."""
    rows = []
    for problem, before, after in zip(problems, original, trained, strict=True):
        row = {
            "question": problem["question"],
            "ground_truth": task.ground_truth(problem),
            "original": _side(before),
            "trained": _side(after),
        }
        row["improvement"] = row["trained"]["avg_score"] - row["original"]["avg_score"]
        rows.append(row)
    every = {
        side: [r for row in rows for r in row[side]["responses"]]
        for side in ("original", "trained")
    }
    stats: dict[str, Any] = {
        "num_problems": len(rows),
        "num_responses_per_prompt": len(original[0]) if original else 0,
    }
    for side, responses in every.items():
        stats[f"{side}_avg_score"] = _mean([r["reward"] for r in responses])
        stats[f"{side}_accuracy"] = _mean([float(r["correct"]) for r in responses])
    before, after = stats["original_avg_score"], stats["trained_avg_score"]
    stats["improvement"] = after - before
    stats["improvement_percentage"] = relative_change(before, after)
    return {"problems": rows, "comparison_stats": stats}


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(result: dict[str, Any], width: int = 40) -> str:
    """A plain-text table: per problem the mean score of each model and the first responses."""
    stats = result["comparison_stats"]
    lines = [
        f"model comparison: mean reward of {stats['num_responses_per_prompt']} sampled "
        "responses per prompt",
        f"  {'#':>2}  {'question':<{width}} {'truth':>12} "
        f"{'original':>9} {'trained':>9} {'change':>8}",
    ]
    for i, row in enumerate(result["problems"], start=1):
        before, after = row["original"], row["trained"]
        lines.append(
            f"  {i:>2}  {_clip(row['question'], width):<{width}}"
            f" {_clip(row['ground_truth'], 12):>12} {before['avg_score']:9.3f}"
            f" {after['avg_score']:9.3f} {row['improvement']:+8.3f}"
        )
        for side in ("original", "trained"):
            first = row[side]["responses"][0]["completion"] if row[side]["responses"] else ""
            lines.append(f"        {side:>8}: {_clip(first, width + 30)!r}")
    pct = stats["improvement_percentage"]
    lines.append(
        f"  {'':>2}  {'average':<{width}} {'':>12} {stats['original_avg_score']:9.3f}"
        f" {stats['trained_avg_score']:9.3f} {stats['improvement']:+8.3f}"
        + (f" ({pct:+.1f}%)" if pct is not None else "")
    )
    lines.append(
        f"  {'':>2}  {'accuracy':<{width}} {'':>12} {stats['original_accuracy']:9.3f}"
        f" {stats['trained_accuracy']:9.3f}"
    )
    return "\n".join(lines)


@contextmanager
def original_model(policy: Policy, load_original: Callable[[], Policy]) -> Iterator[Policy]:
    """The model before training: the policy with its adapters off (LoRA), or
    `load_original()` (full fine-tuning)."""
    if policy.uses_lora:
        with policy.model.disable_adapter():
            yield policy
    else:
        yield load_original()


def compare_models(cfg: DictConfig, evaluator: Evaluator, run_dir: Path) -> dict[str, Any]:
    """Compare the trained policy of `evaluator`'s rollout source with the original as
    `cfg.eval.comparison` says, with the evaluation's sampling; write and print it.

    Both models sample from the same seed (`cfg.seed`) through the same backend, which is
    handed the original's weights for its turn and the trained ones back after. Returns the
    result; the JSON is written to `run_dir/comparison.json`.
    """
    settings, task, source = cfg.eval.comparison, evaluator.task, evaluator.source
    prompts = task.examples if settings.prompts is None else list(settings.prompts)
    problems = comparison_problems(prompts, task.test, settings.num_heldout)
    n = settings.num_responses_per_prompt or cfg.algorithm.num_responses_per_prompt
    policy = source.policy
    device = str(policy.model.device)
    torch.manual_seed(cfg.seed)
    trained = evaluator.complete(problems, n, evaluator.sampled)
    with original_model(policy, lambda: instantiate(cfg.model, device=device)) as original_policy:
        source.backend.sync(original_policy.model)
        torch.manual_seed(cfg.seed)
        original = evaluator.complete(problems, n, evaluator.sampled)
    source.backend.sync(policy.model)
    result = comparison_result(task, problems, original, trained)
    (Path(run_dir) / "comparison.json").write_text(json.dumps(result, indent=2))
    print("\n" + format_table(result))
    return result
