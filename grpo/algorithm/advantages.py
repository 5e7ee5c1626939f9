"""Advantage estimators: one number per completion from the rewards of its group (no critic).

Rows are contiguous groups: rows [k*G, (k+1)*G) are the G completions of prompt k. Every entry
of `ADVANTAGE_ESTIMATORS` is called as

    fn(rewards, group_size, parts, **settings) -> advantages

with `rewards` [N] (floating point, finite), `parts` the reward's named parts {name: [N]} (they
sum to `rewards`; most estimators ignore them), and returns [N], shared by every token of the
completion. `algorithm.advantage.name` picks the entry; its other keys are the settings, given
by `conf/algorithm/advantage/<name>.yaml`. A group whose rewards all agree gets exactly zero
advantages, whatever the estimator's arithmetic would round to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import torch
from torch import Tensor

from grpo.registry import Interval, Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POSITIVE = Interval(0.0)  # (0, inf)


def grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Check the rewards and view them as [num_groups, group_size] (floating point)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size})"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel() > 0:
        row = int(bad[0])
        raise ValueError(
            f"reward at row {row} (group {row // group_size}) is {rewards[row].item()}; "
            "rewards must be finite"
        )
    return rewards.view(-1, group_size)


def centred(groups: Tensor) -> Tensor:
    """r_i - mean(group), exactly zero for groups whose rewards are all equal.

    The explicit zero matters: the float mean of identical values can be off by one ulp
    (e.g. eight rewards of 0.1), which divided by a tiny std + eps would give spurious
    advantages of order 1e-4 instead of none.
    """
    out = groups - groups.mean(dim=1, keepdim=True)
    return out.masked_fill(constant_groups(groups), 0.0)


def constant_groups(groups: Tensor) -> Tensor:
    """[num_groups, 1] bool: the group's rewards are all equal."""
    return (groups == groups[:, :1]).all(dim=1, keepdim=True)


def spread(centred_groups: Tensor) -> Tensor:
    """Population std of each group from its centred rewards: [num_groups, 1]."""
    return centred_groups.pow(2).mean(dim=1, keepdim=True).sqrt()


def group_reward_spread(rewards: Tensor, group_size: int) -> Tensor:
    """Population std of the rewards of each group: Tensor[num_groups], exactly 0 if all equal.

    A group with zero spread gives zero advantages and so no policy-gradient signal; the fraction
    of such groups is worth logging.
    """
    return spread(centred(grouped(rewards, group_size))).squeeze(1)


def estimate_advantages(
    settings: Mapping[str, object],
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The advantages of `settings['name']` (an entry of ADVANTAGE_ESTIMATORS) with the other
    keys of `settings` as its settings: Tensor[N]. The name and settings were checked before
    the run started (`grpo.run.config`)."""
    options = dict(settings)
    name = options.pop("name")
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, dict(parts or {}), **options)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor],
    *,
    eps: Annotated[float, POSITIVE] = 1e-4,
) -> Tensor:
    """(r_i - mean(group)) / (std(group) + eps), population std (DeepSeekMath section 4.1.2)."""
    c = centred(grouped(rewards, group_size))
    return (c / (spread(c) + eps)).reshape(-1)


@ADVANTAGE_ESTIMATORS.register("batch_std")
def batch_std(
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor],
    *,
    eps: Annotated[float, POSITIVE] = 1e-4,
) -> Tensor:
    """(r_i - mean(group)) / (std of all N rewards + eps): one scale for the batch, so a
    question's difficulty no longer sets its weight (TRL `scale_rewards="batch"`; the
    Dr. GRPO discussion of per-question bias)."""
    g = grouped(rewards, group_size)
    return (centred(g) / (g.std(correction=0) + eps)).reshape(-1)


@ADVANTAGE_ESTIMATORS.register("no_std")
def no_std(rewards: Tensor, group_size: int, parts: Mapping[str, Tensor]) -> Tensor:
    """r_i - mean(group), no division (Dr. GRPO, arXiv 2503.20783, section 3.2)."""
    return centred(grouped(rewards, group_size)).reshape(-1)


def beta_weights(p: Tensor, max_weight: float = 1e6) -> Tensor:
    """BNPO's 1 / f(p; alpha, beta) per group, for group mean rewards p in [0, 1]: Tensor[K].

    (a, b) are the method-of-moments Beta fit of p over the K groups (unbiased variance), and
    alpha = max(1, 1 + a/3), beta = max(1, 1 + b/3), as in BNPO and its authors' code. With
    alpha = beta = 3/2 the weight is proportional to 1 / sqrt(p (1 - p)), GRPO's 1 / std for
    binary rewards. Weights are capped at max_weight, so a group at p = 0 or 1 (density 0) gets a
    finite weight (its centred rewards are 0 anyway). Ours: fewer than two groups, or p identical
    across them, give the uniform density (alpha = beta = 1): weight 1, REINFORCE with baseline.
    """
    p = p.double()
    mean = p.mean()
    var = p.var() if p.numel() > 1 else p.new_zeros(())
    if var > 0:
        common = mean * (1 - mean) / var - 1
        alpha = (1 + common * mean / 3).clamp(min=1.0)
        beta = (1 + common * (1 - mean) / 3).clamp(min=1.0)
    else:
        alpha = beta = p.new_ones(())
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    log_density = torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm
    return torch.exp(-log_density).clamp(max=max_weight)


@ADVANTAGE_ESTIMATORS.register("bnpo")
def bnpo(
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor],
    *,
    reward_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """BNPO (Xiao et al. 2025, arXiv 2506.02864): with rewards mapped to [0, 1] by
    `reward_range` = (lo, hi) and p the group's mean, (r_i - p) / f(p; alpha, beta), f the Beta
    density fitted to the spread of p over the batch's groups (`beta_weights`)."""
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"reward_range must be (lo, hi) with hi > lo, got {tuple(reward_range)}")
    g = grouped(rewards, group_size)
    outside = ((g < lo) | (g > hi)).flatten().nonzero()
    if outside.numel() > 0:
        row = int(outside[0])
        raise ValueError(
            f"reward {g.flatten()[row].item()} at row {row} is outside reward_range "
            f"{tuple(reward_range)}; BNPO maps rewards to [0, 1] with it"
        )
    p = (g.double().mean(dim=1) - lo) / (hi - lo)
    weights = beta_weights(p.clamp(0.0, 1.0)).to(g.dtype)
    return (centred(g) / (hi - lo) * weights.unsqueeze(1)).reshape(-1)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(rewards: Tensor, group_size: int, parts: Mapping[str, Tensor]) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740, eq. 8): the leave-one-out baseline,

        A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean(group))

    an unbiased baseline (it does not depend on the completion it scores); no division by a
    std. It is Dr. GRPO's `no_std` times G/(G-1)."""
    return (centred(grouped(rewards, group_size)) * (group_size / (group_size - 1))).reshape(-1)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor],
    *,
    eps: Annotated[float, POSITIVE] = 1e-4,
) -> Tensor:
    """REINFORCE++ with a group baseline (Hu et al. 2025, arXiv 2501.03262; verl
    `reinforce_plus_plus_baseline`): the group mean subtracted, then the result normalised over
    the whole batch,

        x_i = r_i - mean(group),    A_i = (x_i - mean_batch(x)) / (std_batch(x) + eps)

    population std. Ours normalises over the N completions; verl's `masked_whiten` normalises
    over tokens, each completion weighted by its length (and with Bessel's correction and
    sqrt(var + 1e-8)). Over completions mean_batch(x) is 0 (every group sums to 0), so this is
    the group-centred reward over the batch std of the centred rewards; `batch_std` divides by
    the std of the raw rewards instead, which also counts the spread between the groups' means.
    """
    c = centred(grouped(rewards, group_size))
    out = (c - c.mean()) / (c.std(correction=0) + eps)
    return out.masked_fill(constant_groups(c), 0.0).reshape(-1)


@ADVANTAGE_ESTIMATORS.register("grpo_passk")
def grpo_passk(
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor],
    *,
    divide_by_std: bool = True,
    eps: Annotated[float, POSITIVE] = 1e-4,
) -> Tensor:
    """Pass@k-style advantage (verl `compute_grpo_passk_outcome_advantage`, which cites Tang et
    al. 2025, "Optimizing Language Models for Inference Time Objectives using Reinforcement
    Learning", arXiv 2503.19595): only the best completion of each group is credited, by how
    much it beats the best of the others (the leave-one-out gradient of max over the group),

        A_best = r_max - r_second_max,   A_i = 0 for the others

    divided by the group's std + eps when `divide_by_std` (verl's norm_adv_by_std_in_grpo).
    A tie for the best gives the group zeros (r_max - r_second_max = 0), as does a group whose
    rewards all agree. The std is the population one, as in `grpo` (verl: Bessel's correction;
    eps 1e-6 there)."""
    g = grouped(rewards, group_size)
    top = g.topk(2, dim=1)
    gap = top.values[:, :1] - top.values[:, 1:]  # [num_groups, 1], 0 on a tie
    if divide_by_std:
        gap = gap / (spread(centred(g)) + eps)
    out = torch.zeros_like(g).scatter(1, top.indices[:, :1], gap)
    return out.masked_fill(constant_groups(g), 0.0).reshape(-1)


@ADVANTAGE_ESTIMATORS.register("gdpo")
def gdpo(
    rewards: Tensor,
    group_size: int,
    parts: Mapping[str, Tensor],
    *,
    part_weights: Mapping[str, float] | None = None,
    batch_normalize: bool = True,
    eps: Annotated[float, POSITIVE] = 1e-4,
) -> Tensor:
    """GDPO, group reward-decoupled normalisation (Liu et al. 2026, arXiv 2601.05242; TRL
    `multi_objective_aggregation="normalize_then_sum"`): each part of the reward is normalised
    within its group before the parts are summed, so a part with a small spread is not drowned
    by one with a large spread, then the sum is normalised over the batch:

        A_n,i = (r_n,i - mean(group of r_n)) / (std(group of r_n) + eps)
        S_i = sum_n w_n A_n,i,    A_i = (S_i - mean_batch(S)) / (std_batch(S) + eps)

    `parts` are the reward's named parts (e.g. correctness, format); without any, the reward
    itself is the one part. w_n = `part_weights` (name -> weight; a part not named weighs 1):
    the weights a reward puts inside its parts cancel in the normalisation. `batch_normalize`
    false skips the last step: with one part that is exactly `grpo`. Population stds (TRL:
    Bessel's correction). Parts must add up to the rewards (with the KL in the reward,
    algorithm.kl.in_reward, they do not: refused).

    Ours: a group whose total rewards all agree gets zeros, as from every estimator here; the
    paper's formula can give it a small non-zero advantage when three or more parts vary in it
    with different spreads.
    """
    g = grouped(rewards, group_size)
    parts = dict(parts) or {"reward": rewards}
    weights = dict(part_weights or {})
    unknown = sorted(set(weights) - set(parts))
    if unknown:
        raise ValueError(
            f"part_weights names {', '.join(unknown)}: not a part of the reward "
            f"(its parts: {', '.join(parts)})"
        )
    total = sum(part.to(g.dtype).reshape(-1) for part in parts.values())
    if not torch.allclose(total, g.reshape(-1), rtol=1e-5, atol=1e-6):
        row = int((total - g.reshape(-1)).abs().argmax())
        raise ValueError(
            f"gdpo normalises each part of the reward, but the parts do not add up to the "
            f"reward at row {row} ({total[row].item()} vs {g.reshape(-1)[row].item()}); "
            "with algorithm.kl.in_reward the KL penalty is in the reward and in no part"
        )
    summed = torch.zeros_like(g)
    for name, part in parts.items():
        c = centred(grouped(part.to(g.dtype), group_size))
        summed = summed + weights.get(name, 1.0) * c / (spread(c) + eps)
    if batch_normalize:
        summed = (summed - summed.mean()) / (summed.std(correction=0) + eps)
    return summed.masked_fill(constant_groups(g), 0.0).reshape(-1)
