"""The rollout-vs-training correction: the engine that sampled is not the model that trains.

An inference engine (vLLM, or a 4-bit or bf16 decoder) computes the sampling distribution with
other kernels or precision than the training forward pass, so even at mu = 1 the update is
slightly off-policy: the tokens came from pi_engine, the loss assumes pi_old (Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training"). Each entry of
`ROLLOUT_CORRECTIONS` turns the token ratio

    w_t = pi_old(y_t) / pi_engine(y_t) = exp(old_logp - engine_logp)

into per-token weights on the policy loss (detached, [B, T]; 0 drops a token):

    none               1
    token_truncate     min(w_t, cap)                          TIS (Yao et al.; TRL, verl)
    token_mask         1 where low <= w_t <= high, else 0     MIS / IcePop (arXiv 2510.18855)
    sequence_truncate  min(prod_t w_t, cap) on every token    TRL `sequence_truncate`
    sequence_mask      1 where low <= prod_t w_t <= high      TRL `sequence_mask`, verl seq MIS

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


@ROLLOUT_CORRECTIONS.register("token_mask")
def token_mask(
    old_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    *,
    low: Annotated[float, POSITIVE] = 0.5,
    high: Annotated[float, POSITIVE] = 2.0,
) -> Tensor:
    """Masked importance sampling per token: drop tokens whose w_t leaves [low, high] (IcePop's
    [0.5, 2])."""
    w = _log_ratio(old_logp, engine_logp, mask).exp()
    return ((w >= low) & (w <= high)).to(old_logp.dtype)


def _sequence_ratio(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> Tensor:
    """prod_t w_t of each completion, [B, 1]."""
    return _log_ratio(old_logp, engine_logp, mask).sum(-1, keepdim=True).exp()


@ROLLOUT_CORRECTIONS.register("sequence_truncate")
def sequence_truncate(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, *, cap: Annotated[float, POSITIVE] = 2.0
) -> Tensor:
    """One truncated weight per completion, min(prod_t w_t, cap), on each of its tokens."""
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
    """Drop whole completions whose prod_t w_t leaves [low, high]."""
    w = _sequence_ratio(old_logp, engine_logp, mask)
    return ((w >= low) & (w <= high)).to(old_logp.dtype).expand_as(old_logp)


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
