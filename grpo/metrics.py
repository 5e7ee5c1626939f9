"""Per-step numbers about a scored rollout, under the names the logs use."""

from __future__ import annotations

import torch

from grpo.advantages import group_reward_spread
from grpo.rollout import Rollout


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
