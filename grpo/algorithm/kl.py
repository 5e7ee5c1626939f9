"""KL estimators: the per-token estimate of KL(pi || pi_ref) from the sampled tokens.

Each entry of `KL_ESTIMATORS` takes the policy's log-probs `logp`, the reference's `ref` and
the sampling (old) policy's `old` at the sampled tokens, all [B, T], and returns [B, T]. With
d = ref - logp (Schulman, "Approximating KL divergence", 2020):

    k1          -d                          unbiased, high variance, can be negative
    k2          d^2 / 2                     biased, low variance
    k3          exp(d) - d - 1              unbiased, low variance, >= 0 (DeepSeekMath eq. 4)
    low_var_kl  k3 with d clamped to [-20, 20] and the result to [-10, 10] (verl)
    k3_is       exp(logp - old) * k3        k3 importance-weighted from the sampling policy to
                                            the current one: unbiased also when old != current
                                            (DeepSeek-V3.2, arXiv 2512.02556; TRL
                                            `use_bias_correction_kl`)

`algorithm.kl.estimator` picks one by name; `algorithm.kl.in_reward` places it in the reward
instead of the loss (`sequence_kl_penalty`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grpo.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref: Tensor, old: Tensor) -> Tensor:
    """log(pi / pi_ref): the plain log-ratio (Schulman's k1)."""
    return logp - ref


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref: Tensor, old: Tensor) -> Tensor:
    """(log(pi / pi_ref))^2 / 2 (Schulman's k2)."""
    return 0.5 * (logp - ref).square()


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref: Tensor, old: Tensor) -> Tensor:
    """pi_ref / pi - log(pi_ref / pi) - 1 (Schulman's k3; DeepSeekMath eq. 4).

    Written with expm1 so that it stays >= 0 in float32 when the log-ratio is tiny (exp(d) - 1
    would round to 0 and leave -d). Zero where pi equals pi_ref.
    """
    log_ratio = ref - logp
    return torch.expm1(log_ratio) - log_ratio


@KL_ESTIMATORS.register("low_var_kl")
def low_var_kl(logp: Tensor, ref: Tensor, old: Tensor) -> Tensor:
    """k3 with the log-ratio clamped to [-20, 20] and the estimate to [-10, 10] (verl's
    `low_var_kl`): bounded when the policy has drifted far from the reference."""
    log_ratio = (ref - logp).clamp(-20.0, 20.0)
    return (torch.expm1(log_ratio) - log_ratio).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("k3_is")
def k3_is(logp: Tensor, ref: Tensor, old: Tensor) -> Tensor:
    """pi / pi_old * k3 (DeepSeek-V3.2, arXiv 2512.02556, section 3.1): the tokens were
    sampled from pi_old, so k3 is reweighted to an unbiased estimate under pi. The weight
    carries gradient, as in the paper's formula and in TRL's `use_bias_correction_kl` (its
    ratio is not detached): the expected gradient is then that of KL(pi || pi_ref); detached, it
    would be that of the reverse KL(pi_ref || pi) (tests/algorithm/test_kl.py). Equals k3 in
    value when pi_old = pi."""
    return torch.exp(logp - old) * k3(logp, ref, old)


def sequence_kl_penalty(
    estimator: str, logp: Tensor, ref: Tensor, mask: Tensor, coef: float
) -> Tensor:
    """beta * sum over each completion's tokens of the KL estimate: [B], to subtract from the
    rewards before the advantages (KL in the reward: InstructGPT, arXiv 2203.02155; verl's
    `use_kl_in_reward`). `logp` are the sampling policy's log-probs, so `old` = `logp`."""
    kl = KL_ESTIMATORS[estimator](logp, ref, logp)
    return coef * torch.where(mask.bool(), kl, 0.0).sum(-1)
