"""Group-relative advantages (DeepSeekMath, arXiv 2402.03300, section 4.1.2).

GRPO drops the value network: each prompt is answered G times and every completion is scored
against its own group. With outcome rewards r_1..r_G of one prompt,

    A_i = (r_i - mean(r)) / (std(r) + eps)

and A_i is shared by every token of completion i. Rows of the reward vector are contiguous
groups: rows [k*G, (k+1)*G) are the G completions of prompt k.

BNPO (Xiao et al. 2025, arXiv 2506.02864) replaces the std by a Beta density: with rewards mapped
to [0, 1] and p the group's mean, A_i = (r_i - p) / f(p; alpha, beta), where alpha and beta are
fitted to the spread of p over the batch's groups (`beta_weights`).
"""

import torch
from torch import Tensor

SCALES = ("group", "batch", "none", "beta")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Check the rewards and view them as [num_groups, group_size] (floating point)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
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


def _centred(grouped: Tensor) -> Tensor:
    """r_i - mean(group), exactly zero for groups whose rewards are all equal.

    The explicit zero matters: the float mean of identical values can be off by one ulp
    (e.g. eight rewards of 0.1), which divided by a tiny std + eps would give spurious
    advantages of order 1e-4 instead of none.
    """
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0)


def _spread(centred: Tensor) -> Tensor:
    """Population std of each group from its centred rewards: [num_groups, 1]."""
    return centred.pow(2).mean(dim=1, keepdim=True).sqrt()


def group_reward_spread(rewards: Tensor, group_size: int) -> Tensor:
    """Population std of the rewards of each group: Tensor[num_groups], exactly 0 if all equal.

    A group with zero spread gives zero advantages and so no policy-gradient signal; the fraction
    of such groups is worth logging.
    """
    return _spread(_centred(_grouped(rewards, group_size))).squeeze(1)


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


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    reward_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Group-relative advantages A_i = (r_i - mean(group)) / (std + eps): Tensor[N].

    scale picks the std:
      - "group": std of the completion's own group (DeepSeekMath, eq. in section 4.1.2);
      - "batch": std of all N rewards (one scale for the whole batch, as in REINFORCE++ and the
        Dr. GRPO discussion of per-question difficulty bias);
      - "none":  no division, only the centred reward (Dr. GRPO, arXiv 2503.20783);
      - "beta":  BNPO (arXiv 2506.02864): rewards mapped to [0, 1] by reward_range = (lo, hi),
        then the centred reward times `beta_weights` of the group means; eps is not used.

    The std is the population one (correction=0): the normalised advantages of a group then
    have unit variance (up to eps) for any G (for G=2 they are +-1), whereas the unbiased std would
    shrink them by sqrt((G-1)/G), e.g. +-0.707 for G=2. TRL uses the unbiased std, so its
    advantages differ from these by that factor.

    A group whose rewards are all equal gets exactly zero advantages (never NaN).
    Raises ValueError for group_size < 2, N not a multiple of group_size, non-finite rewards
    (naming the row and its group), an unknown scale or eps <= 0, and (for "beta") a reward
    outside reward_range.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    grouped = _grouped(rewards, group_size)
    centred = _centred(grouped)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "beta":
        return _beta_scaled(grouped, centred, reward_range).reshape(-1)
    std = _spread(centred) if scale == "group" else grouped.std(correction=0)
    return (centred / (std + eps)).reshape(-1)


def _beta_scaled(grouped: Tensor, centred: Tensor, reward_range: tuple[float, float]) -> Tensor:
    """BNPO: (r - p) / f(p) on rewards mapped to [0, 1] by reward_range, per group."""
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"reward_range must be (lo, hi) with hi > lo, got {reward_range}")
    outside = ((grouped < lo) | (grouped > hi)).flatten().nonzero()
    if outside.numel() > 0:
        row = int(outside[0])
        raise ValueError(
            f"reward {grouped.flatten()[row].item()} at row {row} is outside reward_range "
            f"{tuple(reward_range)}; BNPO maps rewards to [0, 1] with it"
        )
    p = (grouped.double().mean(dim=1) - lo) / (hi - lo)
    weights = beta_weights(p.clamp(0.0, 1.0)).to(centred.dtype)
    return centred / (hi - lo) * weights.unsqueeze(1)
