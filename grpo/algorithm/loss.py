"""The GRPO objective as a loss to minimise: DeepSeekMath (arXiv 2402.03300) eq. 3 with eq. 4.

For token t of completion i, with advantage A_i broadcast over its tokens:

    loss_t = policy_loss_t + beta kl_t - entropy_coef H_t

- `policy_loss_t` comes from the registry `POLICY_LOSSES` (`clip`: PPO's clipped surrogate on
  token ratios, eq. 3; `algorithm.policy_loss.name` picks another);
- `kl_t` from `KL_ESTIMATORS` (`k3`, eq. 4; `algorithm.kl.estimator`), unless the KL is placed
  in the reward (`algorithm.kl.in_reward`);
- `H_t` the token entropy, an optional bonus.

The rollout-vs-training correction (`ROLLOUT_CORRECTIONS`, `algorithm.rollout_correction`)
weights each token's policy loss by a truncated or masked ratio between the training pass and the
engine that sampled (given as `sampling_logprobs`); off (`none`) by default, the mismatch is then
only logged.

Token selection, both off by default: `top_entropy_quantile` rho < 1 gives policy gradient only
to the rho fraction of valid tokens with the highest entropy in the batch (Wang et al. 2025,
arXiv 2506.01939; the caller passes that `selected` mask). The policy loss is given the selected
tokens as its mask, so a sequence-level loss (gspo, gspo_token, gmpo) forms its ratio from them
alone and no policy gradient reaches the others; the KL and entropy terms stay on every valid
token. `off_policy_mask_threshold` delta
drops completions with A < 0 whose mean log-ratio log(pi_old / pi) exceeds delta (DeepSeek-V3.2
off-policy sequence masking, arXiv 2512.02556; TRL `off_policy_mask_threshold`).

The per-token losses of valid tokens are reduced by one of `AGGREGATIONS`:

    seq_mean_token_mean      1/B sum_i (1/|o_i|) sum_t loss_t    DeepSeekMath eq. 3 (default)
    token_mean               sum_{i,t} loss_t / sum_i |o_i|      DAPO (arXiv 2503.14476), BNPO
    seq_mean_token_sum_norm  1/B sum_i sum_t loss_t / L_max      Dr. GRPO (arXiv 2503.20783)

B (num_sequences) and sum_i |o_i| (num_tokens) may be the totals over the whole optimiser batch
(all micro-batches and ranks), so that the micro-batch losses add up to the loss of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from grpo.algorithm.kl import KL_ESTIMATORS
from grpo.algorithm.policy_losses import POLICY_LOSSES
from grpo.algorithm.rollout_correction import ROLLOUT_CORRECTIONS, mismatch_stats
from grpo.registry import Registry

AGGREGATIONS = Registry("aggregation")


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of values over valid tokens; padding never contributes (not even NaN or inf)."""
    masked = torch.where(mask, values, 0.0)
    return masked.sum() if dim is None else masked.sum(dim)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Mean over each completion's tokens, then mean over completions (DeepSeekMath eq. 3)."""
    per_sequence = _masked_sum(values, mask, dim=-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.sum() / (values.shape[0] if num_sequences is None else num_sequences)


@AGGREGATIONS.register("token_mean")
def token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Sum over all valid tokens / number of valid tokens (DAPO section 3.3)."""
    total = int(mask.sum()) if num_tokens is None else num_tokens
    return _masked_sum(values, mask) / max(total, 1)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Sum over each completion's tokens / max_completion_length, then mean (Dr. GRPO).

    The constant normaliser removes the length bias of seq_mean_token_mean: a token's gradient
    no longer depends on the length of its completion.
    """
    if max_completion_length is None:
        raise ValueError("seq_mean_token_sum_norm needs max_completion_length")
    per_sequence = _masked_sum(values, mask, dim=-1) / max_completion_length
    return per_sequence.sum() / (values.shape[0] if num_sequences is None else num_sequences)


def _mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and population std (defined for a single element) of a 1-D tensor."""
    return values.mean().item(), values.std(correction=0).item()


def off_policy_mask(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, delta: float):
    """[B, 1] bool, False for completions with A < 0 whose mean over valid tokens of
    log(pi_old / pi) exceeds `delta` (DeepSeek-V3.2 off-policy sequence masking, eq. 9 as TRL
    `get_off_policy_mask` writes it: the same sign, the same per-completion token mean). TRL
    takes pi_old from the inference engine when it has one (vLLM), so its mask also sees the
    engine-vs-trainer mismatch; here pi_old is the trainer's own log-probs of the sampling
    policy, so only the drift of the optimiser steps counts."""
    drift = _masked_sum((old_logp - logp).detach(), mask, dim=-1) / mask.sum(-1).clamp(min=1)
    return ~((advantages.reshape(-1) < 0) & (drift > delta)).unsqueeze(-1)


class LossTerms(NamedTuple):
    """The per-token terms of one forward pass, [B, T] (None: not computed), for its stats."""

    policy: Tensor  # the policy loss after the rollout correction and the token masks
    clipped: dict[str, Tensor]  # where the policy loss's bounds bind (PolicyLoss.clipped)
    gradient: Tensor | None  # tokens whose policy loss counts (None: all)
    weights: Tensor | None  # the rollout correction's weights (None: no engine log-probs)
    kl: Tensor | None  # the KL estimate (None: no reference log-probs)
    entropy: Tensor | None  # the token entropy (None: not given)


class GRPOLoss(nn.Module):
    """The loss of one (micro-)batch; built by Hydra from `algorithm.loss` (`_target_`) with
    the `algorithm.policy_loss` and `algorithm.kl` settings and the generation budget.

    policy_loss: {name: an entry of POLICY_LOSSES, **its settings}; kl: {coef (beta >= 0),
    estimator (an entry of KL_ESTIMATORS), in_reward (then the loss has no KL term)};
    max_completion_length: the constant of seq_mean_token_sum_norm (Dr. GRPO's generation
    budget). The settings are trusted: `grpo.run.config.validate_config` checks their names,
    ranges and registry entries before any model loads.
    """

    def __init__(
        self,
        policy_loss: Mapping[str, Any] | None = None,
        kl: Mapping[str, Any] | None = None,
        rollout_correction: Mapping[str, Any] | None = None,
        aggregation: str = "seq_mean_token_mean",
        entropy_coef: float = 0.0,
        top_entropy_quantile: float = 1.0,
        off_policy_mask_threshold: float | None = None,
        max_completion_length: int | None = None,
    ) -> None:
        super().__init__()
        settings = dict(policy_loss or {"name": "clip"})
        self.policy_loss_name = settings.pop("name")
        self.policy_loss = partial(POLICY_LOSSES[self.policy_loss_name], **settings)
        correction = dict(rollout_correction or {"name": "none"})
        self.correction_name = correction.pop("name")
        self.correction = partial(ROLLOUT_CORRECTIONS[self.correction_name], **correction)
        kl = {"coef": 0.04, "estimator": "k3", "in_reward": False, **(kl or {})}
        self.kl_coef = 0.0 if kl["in_reward"] else float(kl["coef"])
        self.kl_estimator = KL_ESTIMATORS[kl["estimator"]]
        self.aggregation = aggregation
        self.max_completion_length = max_completion_length
        self.entropy_coef = entropy_coef
        self.top_entropy_quantile = top_entropy_quantile
        self.off_policy_mask_threshold = off_policy_mask_threshold

    def extra_repr(self) -> str:
        return (
            f"policy_loss={self.policy_loss_name}{self.policy_loss.keywords}, "
            f"kl_coef={self.kl_coef}, aggregation={self.aggregation}, "
            f"entropy_coef={self.entropy_coef}, top_entropy_quantile={self.top_entropy_quantile}"
        )

    @property
    def selects_tokens(self) -> bool:
        """Whether the caller must pass the `selected` mask (top-entropy tokens)."""
        return self.top_entropy_quantile < 1

    def _check_inputs(
        self,
        logprobs: Tensor,
        per_token: dict[str, Tensor | None],
        advantages: Tensor,
    ) -> None:
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
        for name, tensor in per_token.items():
            if tensor is not None and tensor.shape != logprobs.shape:
                raise ValueError(
                    f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, "
                    f"got {tuple(tensor.shape)}"
                )
        if advantages.shape != logprobs.shape[:1]:
            raise ValueError(
                f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}"
            )
        needs = {
            "ref_logprobs": self.kl_coef > 0,
            "entropy": self.entropy_coef > 0,
            "selected": self.selects_tokens,
        }
        for name, needed in needs.items():
            if needed and per_token[name] is None:
                raise ValueError(f"{name} is required by this loss's settings")

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        advantages: Tensor,
        mask: Tensor,
        entropy: Tensor | None = None,
        num_sequences: int | None = None,
        num_tokens: int | None = None,
        selected: Tensor | None = None,
        sampling_logprobs: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss over a (micro-)batch and its statistics as python floats.

        Shapes: logprobs, old_logprobs, ref_logprobs, mask, entropy, selected,
        sampling_logprobs [B, T]; advantages [B]. `mask`: the tokens in the loss (the model's
        own: not padding, not a trajectory's environment tokens; every term, aggregation and
        statistic counts them alone). old_logprobs=None means on-policy (ratio 1 in
        value, gradient of logp kept). `selected`: tokens that get policy gradient (top-entropy
        selection); `sampling_logprobs`: the generating engine's log-probs of the tokens (the
        rollout-vs-training correction and its mismatch statistics).
        num_sequences / num_tokens: totals over the optimiser batch; None uses this batch's.
        Loss-valued stats (total_loss, policy_loss, kl_penalty, entropy_bonus) use the same
        normalisers, so they too add up over micro-batches; token stats are over valid tokens.
        """
        per_token_inputs = {
            "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs,
            "mask": mask,
            "entropy": entropy,
            "selected": selected,
            "sampling_logprobs": sampling_logprobs,
        }
        self._check_inputs(logprobs, per_token_inputs, advantages)
        mask = mask.bool()
        aggregate = partial(
            AGGREGATIONS[self.aggregation],
            mask=mask,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_completion_length=self.max_completion_length,
        )
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
        selected = selected.bool() if selected is not None and self.selects_tokens else None
        # The policy loss sees only the tokens that get policy gradient: a sequence-level loss
        # forms its ratio from the selected tokens (docs/algorithms.md, token selection).
        policy_mask = mask if selected is None else mask & selected
        policy = self.policy_loss(logprobs, old_logprobs, advantages.unsqueeze(-1), policy_mask)
        policy_loss = policy.loss
        gradient = None  # tokens whose policy loss counts (None: all)
        if self.off_policy_mask_threshold is not None:
            gradient = off_policy_mask(
                logprobs, old_logprobs, advantages, mask, self.off_policy_mask_threshold
            ).expand_as(mask)
        if selected is not None:
            gradient = selected if gradient is None else gradient & selected
        weights = None
        if sampling_logprobs is not None:
            weights = self.correction(old_logprobs, sampling_logprobs, mask)
            policy_loss = policy_loss * weights
        if gradient is not None:
            policy_loss = torch.where(gradient, policy_loss, 0.0)
        per_token = policy_loss
        kl = None
        if ref_logprobs is not None:  # logged also at beta = 0 (e.g. with the KL in the reward)
            kl = self.kl_estimator(logprobs, ref_logprobs, old_logprobs)
            per_token = per_token + self.kl_coef * kl
        if entropy is not None:
            per_token = per_token - self.entropy_coef * entropy
        loss = aggregate(per_token)
        terms = LossTerms(policy_loss, policy.clipped, gradient, weights, kl, entropy)
        with torch.no_grad():
            stats = self._statistics(
                loss, terms, aggregate, logprobs, old_logprobs, advantages, mask, sampling_logprobs
            )
        return loss, stats

    def _statistics(
        self,
        loss: Tensor,
        terms: LossTerms,
        aggregate: Callable[[Tensor], Tensor],
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        sampling_logprobs: Tensor | None,
    ) -> dict[str, float]:
        """The loss's statistics as python floats (no gradient): loss-valued ones aggregated as
        the loss is, token-valued ones over the valid tokens."""
        stats = {"total_loss": loss.item(), "policy_loss": aggregate(terms.policy).item()}
        ratio = torch.exp(logprobs - old_logprobs)
        stats["ratio_mean"], stats["ratio_std"] = _mean_std(ratio[mask])
        stats["advantages_mean"], stats["advantages_std"] = _mean_std(advantages)
        region = torch.zeros_like(mask)  # where a clip_* bound binds (TRL's clip region)
        for name, where in terms.clipped.items():
            where = where.expand_as(mask)
            stats[f"{name}_fraction"] = where[mask].double().mean().item()
            if name.startswith("clip_"):
                region |= where
        stats["clip_fraction"] = region[mask].double().mean().item()
        if terms.gradient is not None:
            stats["masked_fraction"] = (~terms.gradient[mask]).double().mean().item()
        if sampling_logprobs is not None:
            stats.update(mismatch_stats(old_logprobs, sampling_logprobs, mask))
            changed = (terms.weights != 1).expand_as(mask)[mask]
            stats["rollout_corrected_fraction"] = changed.double().mean().item()
        if terms.kl is not None:
            stats["kl_penalty"] = aggregate(self.kl_coef * terms.kl).item()
            stats["kl_mean"], stats["kl_std"] = _mean_std(terms.kl[mask])
        if terms.entropy is not None:
            stats["entropy_bonus"] = aggregate(self.entropy_coef * terms.entropy).item()
            stats["entropy_mean"] = terms.entropy[mask].mean().item()
        return stats
