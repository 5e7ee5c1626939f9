"""Per-step numbers about a scored rollout, under the names the logs use, and sample records."""

from __future__ import annotations

from typing import Any

import torch

from grpo.algorithm.advantages import group_reward_spread
from grpo.batch import Rollout, ScoredRollout
from grpo.environments.base import stat_means
from grpo.tasks.base import Task


def reward_metrics(rewards: torch.Tensor, parts: dict[str, list[float]], group_size: int):
    """`rewards/*` distribution, each reward part's mean, and `group_stats/*`."""
    r = rewards.double()
    q = torch.quantile(r, torch.tensor([0.25, 0.5, 0.75], dtype=r.dtype))
    spread = group_reward_spread(rewards, group_size)
    metrics = {
        "rewards/mean": r.mean().item(),
        "rewards/std": r.std(correction=0).item(),
        "rewards/max": r.max().item(),
        "rewards/min": r.min().item(),
        "rewards/median": q[1].item(),
        "rewards/q25": q[0].item(),
        "rewards/q75": q[2].item(),
        "group_stats/num_groups": len(spread),
        "group_stats/avg_group_size": float(group_size),
        "group_stats/zero_spread_fraction": (spread == 0).double().mean().item(),
    }
    metrics.update({f"rewards/{name}": sum(v) / len(v) for name, v in parts.items()})
    return metrics


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    """Completion length (mean, max) and the fraction cut at `max_new_tokens`."""
    lengths = rollout.lengths.double()
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/truncated_fraction": rollout.truncated.double().mean().item(),
    }


def parameter_norm(parameters: list[torch.Tensor]) -> float:
    """Global L2 norm of `parameters` (e.g. the trainable ones), for model monitoring."""
    with torch.no_grad():
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in parameters])
        ).item()


def sample_records(
    task: Task, batch: ScoredRollout, advantages: torch.Tensor
) -> list[dict[str, Any]]:
    """One record per completion for sample tables: prompt, completion (a multi-turn
    trajectory whole, the environment's output included), truth, reward, parts, and a
    trajectory's stats (`env`: turns, tool calls, ...)."""
    scores = batch.scores
    records = [
        {
            "prompt": row["question"],
            "completion": text,
            "ground_truth": task.ground_truth(row),
            "reward": scores.total[i],
            "advantage": advantages[i].item(),
            "parts": {name: values[i] for name, values in scores.parts.items()},
        }
        for i, (row, text) in enumerate(zip(batch.rows, batch.rollout.texts, strict=True))
    ]
    for i, record in enumerate(records if batch.stats else ()):
        record["env"] = batch.row_stats(i)
    return records


def step_metrics(
    stats: dict[str, float],
    batch: ScoredRollout,
    group_size: int,
    scheduler: Any,
    trainable: list[torch.Tensor],
    sampler: Any,
    seconds: dict[str, float],
) -> dict[str, float]:
    """Every number logged for one step: the update's statistics (`train/*`), the rewards, the
    completions, a multi-turn environment's per-trajectory means (`env/turns`, `env/<stat>`,
    `env/used_tool`), learning rate, parameter norm, epoch and the time split
    (`timing_metrics`)."""
    metrics = {f"train/{k}": v for k, v in stats.items()}
    metrics.update(reward_metrics(batch.rewards, batch.scores.parts, group_size))
    metrics.update(completion_metrics(batch.rollout))
    metrics.update({f"env/{name}": value for name, value in stat_means(batch.stats).items()})
    metrics["train/learning_rate"] = scheduler.get_last_lr()[0]
    metrics["train/param_norm"] = parameter_norm(trainable)
    metrics["train/epoch"] = sampler.epoch
    metrics.update(timing_metrics(seconds, int(batch.rollout.lengths.sum())))
    return metrics


def timing_metrics(seconds: dict[str, float], tokens: int) -> dict[str, float]:
    """`time/<phase>_s` for each phase of the step (generate, reward, logprobs, advantages,
    update, step: the whole, which also holds the gathering and filtering between them), and
    `time/tokens_per_s`: completion tokens over the step's seconds."""
    metrics = {f"time/{phase}_s": value for phase, value in seconds.items()}
    metrics["time/tokens_per_s"] = tokens / seconds["step"]
    return metrics
