"""The rollout-vs-training correction: the engine that sampled is not the model that trains.

An inference engine (vLLM, or a 4-bit or bf16 decoder) computes the sampling distribution with
other kernels or precision than the training forward pass, so even at mu = 1 the update is
slightly off-policy: the tokens came from pi_engine, the loss assumes pi_old (Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training"). Each entry of
`ROLLOUT_CORRECTIONS` turns the importance ratios of a completion's valid tokens,

    w_t = pi_old(y_t) / pi_engine(y_t) = exp(old_logp - engine_logp)      per token
    W_i = prod_t w_t = exp(sum_t (old_logp - engine_logp))               per completion

into weights on the policy loss of each token (detached, [B, T]; 0 drops a token). Bounds are
inclusive, as in TRL (`vllm_importance_sampling_mode`), verl (`rollout_corr_helper.py`) and
IcePop's M(k) = k on [alpha, beta]:

    none               1
    token_truncate     min(w_t, cap)                TIS (Yao et al.); TRL token_truncate
    token_mask         w_t 1[low <= w_t <= high]    MIS, IcePop (arXiv 2510.18855); TRL token_mask
    token_reject       1[low <= w_t <= high]        rejection alone: kept tokens unweighted
    sequence_truncate  min(W_i, cap)                TRL sequence_truncate; verl Seq-TIS
    sequence_mask      W_i 1[low <= W_i <= high]    TRL sequence_mask; verl Seq-MIS
    sequence_reject    1[low <= W_i <= high]        rejection alone, whole completions
    decoupled          w_t 1[w_t <= cap]            AReaL's decoupled PPO (arXiv 2505.24298)

The sequence_* entries put their completion's weight on each of its tokens.
`algorithm/rollout_correction=<name>` picks one; `GRPOLoss` also logs the mismatch itself
(mean |old_logp - engine_logp| and the k3 estimate of KL(pi_engine || pi_old)) and the fraction
of tokens the weights change.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from grpo.registry import Interval, Registry

ROLLOUT_CORRECTIONS = Registry("rollout correction")
POSITIVE = Interval(0.0)  # (0, inf)


def _log_ratio(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> Tensor:
    """log w_t on valid tokens, 0 on padding; no gradient."""
    return torch.where(mask, (old_logp - engine_logp).detach(), 0.0)


@ROLLOUT_CORRECTIONS.register("none")
def none(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> Tensor:
    """No correction: every weight 1 (the mismatch is still logged)."""
    return torch.ones_like(old_logp)


@ROLLOUT_CORRECTIONS.register("token_truncate")
def token_truncate(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, *, cap: Annotated[float, POSITIVE] = 2.0
) -> Tensor:
    """Truncated importance sampling per token: min(w_t, cap) (verl's default cap 2)."""
    return _log_ratio(old_logp, engine_logp, mask).exp().clamp(max=cap)


def _inside(w: Tensor, low: float, high: float) -> Tensor:
    """1[low <= w <= high] as bool, both bounds inclusive."""
    return (w >= low) & (w <= high)


@ROLLOUT_CORRECTIONS.register("token_mask")
def token_mask(
    old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    *,
    low: Annotated[float, POSITIVE] = 0.5,
    high: Annotated[float, POSITIVE] = 2.0,
) -> Tensor:
    """Masked importance sampling per token, w_t 1[low <= w_t <= high]: tokens inside the
    range keep their importance weight, the others are dropped (IcePop, arXiv 2510.18855:
    M(k) = k on [alpha, beta], 0 outside; TRL `token_mask`)."""
    w = _log_ratio(old_logp, engine_logp, mask).exp()
    return torch.where(_inside(w, low, high), w, 0.0)


@ROLLOUT_CORRECTIONS.register("token_reject")
def token_reject(
    old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    *,
    low: Annotated[float, POSITIVE] = 0.5,
    high: Annotated[float, POSITIVE] = 2.0,
) -> Tensor:
    """Rejection per token, 1[low <= w_t <= high]: drops the tokens whose w_t leaves the range
    and leaves the others unweighted (`token_mask` without its weight)."""
    w = _log_ratio(old_logp, engine_logp, mask).exp()
    return _inside(w, low, high).to(old_logp.dtype)


@ROLLOUT_CORRECTIONS.register("decoupled")
def decoupled(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, *, cap: Annotated[float, POSITIVE] = 5.0
) -> Tensor:
    """The behaviour importance weight of AReaL's decoupled PPO (Fu et al. 2025, arXiv
    2505.24298, eq. 5; AReaL `behav_imp_weight_cap`): w_t = pi_prox / pi_behav, where pi_old
    (the trainer's log-probs before the update) is the proximal policy of the clip and the
    engine's the behaviour policy, and tokens with w_t > cap are dropped: `token_mask`
    without a lower bound."""
    return token_mask(old_logp, engine_logp, mask, low=0.0, high=cap)


def _sequence_ratio(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> Tensor:
    """W_i = prod_t w_t of each completion over its valid tokens, [B, 1]."""
    return _log_ratio(old_logp, engine_logp, mask).sum(-1, keepdim=True).exp()


@ROLLOUT_CORRECTIONS.register("sequence_truncate")
def sequence_truncate(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, *, cap: Annotated[float, POSITIVE] = 2.0
) -> Tensor:
    """Truncated importance sampling per completion, min(W_i, cap) on each of its tokens (TRL
    `sequence_truncate`; verl's Seq-TIS)."""
    w = _sequence_ratio(old_logp, engine_logp, mask).clamp(max=cap)
    return w.expand_as(old_logp)


@ROLLOUT_CORRECTIONS.register("sequence_mask")
def sequence_mask(
    old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    *,
    low: Annotated[float, POSITIVE] = 0.5,
    high: Annotated[float, POSITIVE] = 2.0,
) -> Tensor:
    """Masked importance sampling per completion, W_i 1[low <= W_i <= high] on each of its
    tokens (TRL `sequence_mask`; verl's Seq-MIS, whose truncation at the same upper bound then
    changes nothing)."""
    w = _sequence_ratio(old_logp, engine_logp, mask)
    return torch.where(_inside(w, low, high), w, 0.0).expand_as(old_logp)


@ROLLOUT_CORRECTIONS.register("sequence_reject")
def sequence_reject(
    old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    *,
    low: Annotated[float, POSITIVE] = 0.5,
    high: Annotated[float, POSITIVE] = 2.0,
) -> Tensor:
    """Rejection per completion, 1[low <= W_i <= high] on each of its tokens: drops whole
    completions whose W_i leaves the range, the others unweighted."""
    w = _sequence_ratio(old_logp, engine_logp, mask)
    return _inside(w, low, high).to(old_logp.dtype).expand_as(old_logp)


def mismatch_stats(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the training pass's, on valid tokens:
    mean |difference| and the k3 estimate of KL(pi_engine || pi_old) (tokens drawn from the
    engine: d = log pi_old - log pi_engine, exp(d) - d - 1)."""
    d = (old_logp - engine_logp).detach()[mask]
    if d.numel() == 0:
        return {"rollout_logprob_diff": 0.0, "rollout_kl_k3": 0.0}
    return {
        "rollout_logprob_diff": d.abs().mean().item(),
        "rollout_kl_k3": (torch.expm1(d) - d).mean().item(),
    }
