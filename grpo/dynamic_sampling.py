"""Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476, section 3.2 and eq. 11).

A group whose G rewards all agree has zero advantages: it adds no policy-gradient signal and, as
accuracy rises, more and more of the batch is such groups. DAPO drops them and samples more
prompts until the batch holds `num_groups` groups with reward spread. Here every extra round
samples a full batch of prompts, at most `max_extra_rounds` times; surplus groups with spread are
discarded. If the cap is reached first, the batch is topped up with dropped groups (zero
advantages, as plain GRPO would train on them), so its size never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grpo.advantages import group_reward_spread
from grpo.rewards import RewardOutput
from grpo.rollout import Rollout
from grpo.validation import ConfigError


@dataclass
class ScoredRollout:
    """A generated batch (rows grouped by prompt, G per group) with its data rows and rewards."""

    rows: list[dict[str, str]]  # the data set row (question, answer) of each completion
    rollout: Rollout
    scores: RewardOutput
    generate_s: float = 0.0  # seconds spent generating it (summed over rounds), for the logs

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor(self.scores.total, dtype=torch.float32)


def take_groups(batch: ScoredRollout, groups: list[int], group_size: int) -> ScoredRollout:
    """The rows of `groups` (group indices), in that order."""
    rows = [k * group_size + j for k in groups for j in range(group_size)]
    index = torch.tensor(rows, dtype=torch.long, device=batch.rollout.completion_ids.device)
    r = batch.rollout
    rollout = Rollout(
        r.prompt_ids[index],
        r.prompt_mask[index],
        r.completion_ids[index],
        r.completion_mask[index],
        r.truncated[index],
        [r.texts[i] for i in rows],
    )
    scores = RewardOutput(
        total=[batch.scores.total[i] for i in rows],
        parts={name: [values[i] for i in rows] for name, values in batch.scores.parts.items()},
    )
    return ScoredRollout([batch.rows[i] for i in rows], rollout, scores)


def _pad_cat(tensors: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    """Concatenate [N_i, T_i] tensors along rows, padding each to the widest T on one side."""
    width = max(t.shape[1] for t in tensors)
    pads = [(width - t.shape[1], 0) if left else (0, width - t.shape[1]) for t in tensors]
    return torch.cat([F.pad(t, pad, value=value) for t, pad in zip(tensors, pads, strict=True)])


def concat(batches: list[ScoredRollout], pad_token_id: int) -> ScoredRollout:
    """One batch from several: prompts stay left-padded, completions right-padded."""
    rollouts = [b.rollout for b in batches]
    rollout = Rollout(
        _pad_cat([r.prompt_ids for r in rollouts], pad_token_id, left=True),
        _pad_cat([r.prompt_mask for r in rollouts], 0, left=True),
        _pad_cat([r.completion_ids for r in rollouts], pad_token_id, left=False),
        _pad_cat([r.completion_mask for r in rollouts], 0, left=False),
        torch.cat([r.truncated for r in rollouts]),
        [text for r in rollouts for text in r.texts],
    )
    parts = {
        name: [v for b in batches for v in b.scores.parts[name]] for name in batches[0].scores.parts
    }
    scores = RewardOutput(total=[v for b in batches for v in b.scores.total], parts=parts)
    rows = [row for b in batches for row in b.rows]
    return ScoredRollout(rows, rollout, scores, sum(b.generate_s for b in batches))


def sample_groups(
    draw: Callable[[], ScoredRollout],
    num_groups: int,
    group_size: int,
    pad_token_id: int,
    enabled: bool = False,
    max_extra_rounds: int = 0,
) -> tuple[ScoredRollout, dict[str, float]]:
    """A batch of `num_groups` groups from `draw()` (one generated, scored batch per call).

    Disabled: a single draw, as is. Enabled: keep the groups with reward spread from up to
    1 + max_extra_rounds draws, stopping once `num_groups` are kept; top up from the dropped
    groups if still short. Returns the batch and `sampling_rounds`, `sampling_dropped_groups`
    (groups without spread left out) and `sampling_filled_groups` (groups without spread put
    back because the cap was reached).
    """
    if not enabled:
        return draw(), {}
    if max_extra_rounds < 0:
        key = "algorithm.dynamic_sampling.max_extra_rounds"
        raise ConfigError(f"{key}={max_extra_rounds!r}: must be >= 0")
    kept: list[ScoredRollout] = []
    dropped: list[ScoredRollout] = []
    num_kept = num_dropped = rounds = 0
    generate_s = 0.0
    while num_kept < num_groups and rounds <= max_extra_rounds:
        batch = draw()
        rounds += 1
        generate_s += batch.generate_s
        spread = group_reward_spread(batch.rewards, group_size) > 0
        informative = spread.nonzero().flatten().tolist()[: num_groups - num_kept]
        flat = (~spread).nonzero().flatten().tolist()
        kept += [take_groups(batch, informative, group_size)] if informative else []
        dropped += [take_groups(batch, flat, group_size)] if flat else []
        num_kept += len(informative)
        num_dropped += len(flat)
    filled = num_groups - num_kept
    if filled > 0:
        kept.append(take_groups(concat(dropped, pad_token_id), list(range(filled)), group_size))
    result = concat(kept, pad_token_id)
    result.generate_s = generate_s
    stats = {
        "sampling_rounds": float(rounds),
        "sampling_dropped_groups": float(num_dropped - filled),
        "sampling_filled_groups": float(filled),
    }
    return result, stats
