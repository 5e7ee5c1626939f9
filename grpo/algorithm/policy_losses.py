"""Policy losses: how the importance ratio and the advantage make each token's loss.

Every entry of `POLICY_LOSSES` is called as

    fn(logp, old_logp, advantages, mask, **settings) -> PolicyLoss

with `logp` the current policy's log-probs of the sampled tokens [B, T] (with gradient),
`old_logp` the sampling policy's [B, T] (no gradient; equal to `logp.detach()` on-policy),
`advantages` [B, 1] (a sequence's advantage broadcast over its tokens) or [B, T], and `mask`
the tokens whose loss counts [B, T] (bool): the valid tokens, or with top-entropy selection
(`algorithm.loss.top_entropy_quantile` < 1) the selected ones among them. It returns the loss
to minimise at each token, before the aggregation (`grpo.algorithm.loss.AGGREGATIONS`) reduces
it, and the masks of tokens where a bound binds, logged as fractions ([B, T], or [B, 1] for a
whole completion; masks named clip_* mark tokens left without gradient and add up to
clip_fraction). The settings are the entry's keyword-only parameters, given by
`conf/algorithm/policy_loss/<name>.yaml`. Sequence-level entries (`gspo`, `gspo_token`,
`gmpo`) form their completion's ratio from the tokens of `mask` alone and put its loss on each
of them, so no policy gradient reaches a token outside `mask`; `gspo` and `gmpo` need [B, 1]
advantages. docs/algorithms.md tabulates every entry.

With one optimiser step per generated batch (mu = 1, one mini-batch) old_logp equals logp in
value: every ratio is 1 and no clip binds; the clip matters only from the second step on.
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import torch
from torch import Tensor

from grpo.registry import Interval, Registry

UNIT = Interval(0.0, 1.0)  # (0, 1)
POSITIVE = Interval(0.0)  # (0, inf)

POLICY_LOSSES = Registry("policy loss")


class PolicyLoss(NamedTuple):
    """Per-token loss [B, T] and where clip bounds bind ({name: [B, T] bool})."""

    loss: Tensor
    clipped: dict[str, Tensor]


def clip_masks(ratio: Tensor, advantages: Tensor, low: float, high: float) -> dict[str, Tensor]:
    """Where the clip binds, as TRL logs it: `low` (ratio < 1 - low, A < 0), `high` (ratio >
    1 + high, A > 0); there the clipped term wins the min and the token has no gradient."""
    return {
        "clip_low": (ratio < 1 - low) & (advantages < 0),
        "clip_high": (ratio > 1 + high) & (advantages > 0),
    }


@POLICY_LOSSES.register("clip")
def clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: Annotated[float, UNIT] = 0.2,
    clip_ratio_high: Annotated[float | None, POSITIVE] = None,
    dual_clip: Annotated[float | None, Interval(1.0)] = None,
) -> PolicyLoss:
    """PPO's clipped surrogate on token ratios (DeepSeekMath eq. 3; PPO, arXiv 1707.06347):

        r = exp(logp - old_logp)
        loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)

    eps_low = `clip_ratio`; eps_high = `clip_ratio_high` (null: `clip_ratio`; larger is DAPO's
    clip-higher, arXiv 2503.14476). `dual_clip` c > 1 bounds the loss of tokens with A < 0 by
    -c A (Ye et al. 2020, arXiv 1912.09729); INTELLECT-2's two-sided clipping `delta` (arXiv
    2505.07291, TRL `delta`), min(min(r, delta) A, clip(r) A), is the same function with
    c = delta for any delta > 1 + eps_high (tests/test_policy_losses.py shows it).
    """
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_ratio, 1 + high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    masks = clip_masks(ratio, advantages, clip_ratio, high)
    if dual_clip is not None:
        bound = dual_clip * advantages
        masks["dual_clip"] = (advantages < 0) & (bound > surrogate)
        surrogate = torch.where(masks["dual_clip"], bound, surrogate)
    return PolicyLoss(-surrogate, masks)


@POLICY_LOSSES.register("sapo")
def sapo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    tau_pos: Annotated[float, POSITIVE] = 1.0,
    tau_neg: Annotated[float, POSITIVE] = 1.05,
) -> PolicyLoss:
    """SAPO, Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv 2511.20347): a smooth
    sigmoid gate on the token ratio in place of the hard clip,

        r = exp(logp - old_logp)
        f(r) = sigmoid(tau (r - 1)) * 4 / tau,    tau = tau_pos if A > 0 else tau_neg
        loss = -f(r) A

    The gradient is 4 sigmoid(1 - sigmoid) * r A d log pi: exactly the plain policy gradient at
    r = 1 (f(1) = 2 / tau, f'(1) = 1), fading smoothly as r leaves 1 instead of dropping to 0
    at a clip bound. tau_neg > tau_pos makes tokens with A <= 0 fade faster (the paper: their
    gradients destabilise more). Defaults: the paper's and TRL's (`sapo_temperature_pos=1.0`,
    `sapo_temperature_neg=1.05`). No bound binds, so no masks are logged.
    """
    log_ratio = torch.where(mask, logp - old_logp, 0.0)  # junk in padding never reaches exp
    tau = torch.where(advantages > 0, logp.new_tensor(tau_pos), logp.new_tensor(tau_neg))
    gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1)) * 4 / tau
    return PolicyLoss(-gate * advantages, {})


def per_sequence(advantages: Tensor, name: str) -> Tensor:
    """The advantages as [B, 1]; a sequence-level loss refuses per-token advantages [B, T]."""
    if advantages.dim() != 2 or advantages.shape[-1] != 1:
        raise ValueError(
            f"policy loss {name!r} needs one advantage per completion [B, 1], got shape "
            f"{tuple(advantages.shape)}"
        )
    return advantages


def mean_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """The mean over the completion's tokens in `mask` of log(pi / pi_old): [B, 1]; 0 for a
    completion without any. Other tokens never enter (not even NaN or inf)."""
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    return log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


@POLICY_LOSSES.register("gspo")
def gspo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: Annotated[float, UNIT] = 3e-4,
    clip_ratio_high: Annotated[float | None, POSITIVE] = 4e-4,
) -> PolicyLoss:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071): one
    importance ratio per completion, the geometric mean of its token ratios, clipped per
    completion:

        s_i = (pi(o_i) / pi_old(o_i))^(1 / |o_i|) = exp(mean_t (logp - old_logp))
        loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    broadcast to the completion's tokens in `mask` (the mean is over them too), so that the
    default `seq_mean_token_mean` aggregation gives the paper's 1/G sum_i loss_i. eps_low =
    `clip_ratio`, eps_high = `clip_ratio_high` (null: `clip_ratio`); defaults 3e-4 and 4e-4 are
    the paper's (section 5.1), two orders below the token clip's because s_i is a per-token
    geometric mean. The masks are per completion [B, 1]: where the clip binds the whole
    completion has no gradient.
    """
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    advantages = per_sequence(advantages, "gspo")
    ratio = torch.exp(mean_log_ratio(logp, old_logp, mask))
    clipped = ratio.clamp(1 - clip_ratio, 1 + high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    loss = torch.where(mask, -surrogate, 0.0)
    return PolicyLoss(loss, clip_masks(ratio, advantages, clip_ratio, high))


@POLICY_LOSSES.register("gspo_token")
def gspo_token(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: Annotated[float, UNIT] = 3e-4,
    clip_ratio_high: Annotated[float | None, POSITIVE] = 4e-4,
) -> PolicyLoss:
    """GSPO-token (Zheng et al. 2025, arXiv 2507.18071): a per-token ratio whose
    value is the completion's s_i and whose gradient is that of the token alone,

        s_i,t = sg[s_i] * pi(o_i,t) / sg[pi(o_i,t)]    (value s_i, gradient s_i d log pi_t)
        loss_t = -min(s_i,t A_i,t, clip(s_i,t, 1 - eps_low, 1 + eps_high) A_i,t)

    so that advantages may differ per token ([B, T]); with one advantage per completion it
    equals `gspo` in value and gradient (tests/algorithm/test_policy_losses.py). Settings and
    defaults as `gspo`.
    """
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    sequence = mean_log_ratio(logp, old_logp, mask).detach()
    ratio = torch.exp(torch.where(mask, sequence + logp - logp.detach(), 0.0))
    clipped = ratio.clamp(1 - clip_ratio, 1 + high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    masks = {k: v & mask for k, v in clip_masks(ratio, advantages, clip_ratio, high).items()}
    return PolicyLoss(torch.where(mask, -surrogate, 0.0), masks)


@POLICY_LOSSES.register("cispo")
def cispo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: Annotated[float | None, UNIT] = None,
    clip_ratio_high: Annotated[float, POSITIVE] = 4.0,
) -> PolicyLoss:
    """CISPO, clipped IS-weight policy optimisation (MiniMax-M1, arXiv 2506.13585, section 3.1):
    the importance weight is clipped and detached, and every token keeps its gradient. The
    paper's objective per token is sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi, r =
    exp(logp - old_logp), whose gradient

        d loss / d logp = -clip(r, 1 - eps_low, 1 + eps_high) A

    is REINFORCE with a truncated importance weight, where PPO's clip would zero the token.
    Ours is the loss with exactly that gradient at every point and without a stop-gradient,

        c = clamp(log r, log(1 - eps_low), log(1 + eps_high))
        loss = -A e^c (1 + log r - c)

    -r A inside the range (the value of the unclipped surrogate, comparable with `clip`'s),
    continued linearly in log r outside it. The paper's literal sg(w) A log pi has the same
    gradient but a value that tracks log pi (meaningless as a logged loss) and a gradient that
    is not the derivative of its value (gradcheck fails on it).

    eps_low = `clip_ratio`, null = no lower bound (the paper sets eps_low large and tunes only
    eps_high); eps_high = `clip_ratio_high`, default 4, a cap of 5 on r: TRL's documented value
    for loss_type="cispo" (epsilon_high=5.0, from ScaleRL, arXiv 2510.13786; TRL caps r itself
    at epsilon_high). Masks: `truncated_high` (r > 1 + eps_high) and, with a lower bound,
    `truncated_low`, for any sign of A. Not named clip_*: a truncated token keeps its gradient,
    and clip_fraction counts tokens without one. Logged as truncated_high_fraction.
    """
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    low = None if clip_ratio is None else math.log(1 - clip_ratio)
    high = math.log(1 + clip_ratio_high)
    clamped = log_ratio.clamp(min=low, max=high)
    loss = -advantages * torch.exp(clamped) * (1 + log_ratio - clamped)
    masks = {"truncated_high": mask & (log_ratio > high)}
    if low is not None:
        masks["truncated_low"] = mask & (log_ratio < low)
    return PolicyLoss(torch.where(mask, loss, 0.0), masks)


@POLICY_LOSSES.register("gmpo")
def gmpo(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_log_ratio: Annotated[float, POSITIVE] = 0.4,
    clip_log_ratio_high: Annotated[float | None, POSITIVE] = None,
) -> PolicyLoss:
    """GMPO, Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv 2507.20673): the
    geometric mean of the token ratios, each clipped first, in log space, on the side the
    advantage pushes (PPO's min, per token):

        d_t = logp - old_logp,  c_t = clamp(d_t, -eps_low, eps_high)
        d'_t = min(d_t, c_t) if A > 0 else max(d_t, c_t)
        loss_i = -A_i exp(mean_t d'_t)

    the mean over the completion's tokens in `mask`, the loss broadcast to them (with
    seq_mean_token_mean: 1/G sum_i loss_i, the paper's). eps_low = `clip_log_ratio`, eps_high =
    `clip_log_ratio_high` (null: the same), in log space: the ratio range is (e^-eps_low,
    e^eps_high), the paper's (e^-0.4, e^0.4) by default. The paper writes the clip as
    min(w^sgn(A), clip(w^sgn(A), e1, e2))^sgn(A); with its symmetric range that is the above, as
    in its authors' code, verl's `geo_mean` and TRL's GMPO (with unequal bounds those keep
    (-eps_low, eps_high) for both signs; so do we).
    Unlike GSPO the clip is per token, before the mean: a token past the bound in the direction
    of A has no gradient (masks clip_low / clip_high, per token), the others keep theirs.
    """
    low = clip_log_ratio
    high = clip_log_ratio if clip_log_ratio_high is None else clip_log_ratio_high
    advantages = per_sequence(advantages, "gmpo")
    log_ratio = torch.where(mask, logp - old_logp, 0.0)
    clamped = log_ratio.clamp(-low, high)
    positive = advantages > 0
    clipped = torch.where(
        positive, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped)
    )
    mean = clipped.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    loss = torch.where(mask, -advantages * torch.exp(mean), 0.0)
    masks = {
        "clip_low": mask & (advantages < 0) & (log_ratio < -low),
        "clip_high": mask & positive & (log_ratio > high),
    }
    return PolicyLoss(loss, masks)
