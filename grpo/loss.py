"""GRPO loss: DeepSeekMath (arXiv 2402.03300) eq. 3 with the KL of eq. 4, as a loss to minimise.

For token t of completion i, with sequence advantage A_i broadcast over its tokens:

    r      = exp(logp - old_logp)                            importance ratio (eq. 3)
    s      = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)   PPO clip (eq. 3); eps_low != eps_high
                                                             is DAPO's clip-higher (2503.14476)
    s      = max(s, c A)  where A < 0                        dual clip, optional (Ye et al. 2020,
                                                             arXiv 1912.09729)
    kl     = exp(ref - logp) - (ref - logp) - 1              k3 estimator of KL(pi||pi_ref) (eq. 4)
    loss_t = -(s - beta kl) - entropy_coef H                 entropy bonus optional

The per-token losses of valid (masked-in) tokens are reduced by one of AGGREGATIONS:

    seq_mean_token_mean      1/B sum_i (1/|o_i|) sum_t loss_t    DeepSeekMath eq. 3 (default)
    token_mean               sum_{i,t} loss_t / sum_i |o_i|      DAPO, BNPO
    seq_mean_token_sum_norm  1/B sum_i sum_t loss_t / L_max      Dr. GRPO (arXiv 2503.20783)

B (num_sequences) and sum_i |o_i| (num_tokens) may be the totals over the whole optimizer batch
(all micro-batches and ranks), so that the micro-batch losses add up to the loss of the batch.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of values over valid tokens; padding never contributes (not even NaN or inf)."""
    masked = torch.where(mask, values, 0.0)
    return masked.sum() if dim is None else masked.sum(dim)


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


def token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Sum over all valid tokens / number of valid tokens (DAPO, BNPO)."""
    total = int(mask.sum()) if num_tokens is None else num_tokens
    return _masked_sum(values, mask) / max(total, 1)


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


# All aggregations take the same keyword normalisers and ignore those they do not use.
AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate per token, with the optional dual clip for A < 0.

    advantages must broadcast against ratio (e.g. [B, 1] against [B, T]). Returns the surrogate
    and two bool masks: where the clipped term won the min (and differs), and where the dual clip
    c * A replaced the surrogate. Both clips leave those tokens with zero gradient.
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    clip_active = clipped < unclipped
    if dual_clip is None:
        return surrogate, clip_active, torch.zeros_like(clip_active)
    lower_bound = dual_clip * advantages
    dual_active = (advantages < 0) & (lower_bound > surrogate)
    return torch.where(dual_active, lower_bound, surrogate), clip_active, dual_active


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token (DeepSeekMath eq. 4).

    exp(d) - d - 1 with d = ref - logp, written with expm1 so that it stays >= 0 in float32
    when d is tiny (exp(d) - 1 would round to 0 and leave -d). Zero where pi equals pi_ref.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def _mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and population std (defined for a single element) of a 1-D tensor."""
    return values.mean().item(), values.std(correction=0).item()


class GRPOLoss(nn.Module):
    """GRPO loss with swappable aggregation; built by Hydra (`_target_: grpo.loss.GRPOLoss`).

    clip_ratio_low / clip_ratio_high default to clip_ratio (symmetric PPO clip); set
    clip_ratio_high > clip_ratio_low for DAPO's clip-higher. dual_clip (c > 1) bounds the loss of
    tokens with A < 0 (off when None). kl_coef is beta; max_completion_length is the constant
    normaliser of seq_mean_token_sum_norm.
    """

    def __init__(
        self,
        clip_ratio: float = 0.2,
        clip_ratio_low: float | None = None,
        clip_ratio_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.04,
        aggregation: str = "seq_mean_token_mean",
        max_completion_length: int | None = None,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 < clip_ratio < 1:
            raise ValueError(f"clip_ratio must be in (0, 1), got {clip_ratio}")
        if clip_ratio_low is not None and not 0 < clip_ratio_low < 1:
            raise ValueError(f"clip_ratio_low must be in (0, 1), got {clip_ratio_low}")
        if clip_ratio_high is not None and not clip_ratio_high > 0:
            raise ValueError(f"clip_ratio_high must be > 0, got {clip_ratio_high}")
        if dual_clip is not None and not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if not entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {sorted(AGGREGATIONS)}, got {aggregation!r}"
            )
        if max_completion_length is not None and not max_completion_length > 0:
            raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")
        if aggregation == "seq_mean_token_sum_norm" and max_completion_length is None:
            raise ValueError("max_completion_length is required by seq_mean_token_sum_norm")
        self.clip_low = clip_ratio if clip_ratio_low is None else clip_ratio_low
        self.clip_high = clip_ratio if clip_ratio_high is None else clip_ratio_high
        self.dual_clip = dual_clip
        self.kl_coef = kl_coef
        self.aggregation = aggregation
        self.max_completion_length = max_completion_length
        self.entropy_coef = entropy_coef

    def extra_repr(self) -> str:
        return (
            f"clip=({self.clip_low}, {self.clip_high}), dual_clip={self.dual_clip}, "
            f"kl_coef={self.kl_coef}, aggregation={self.aggregation}, "
            f"max_completion_length={self.max_completion_length}, "
            f"entropy_coef={self.entropy_coef}"
        )

    def _check_inputs(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        advantages: Tensor,
        mask: Tensor,
        entropy: Tensor | None,
    ) -> None:
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
        per_token = {
            "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs,
            "mask": mask,
            "entropy": entropy,
        }
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
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError("ref_logprobs is required when kl_coef > 0")
        if self.entropy_coef > 0 and entropy is None:
            raise ValueError("entropy is required when entropy_coef > 0")

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
    ) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss over a (micro-)batch and its statistics as python floats.

        Shapes: logprobs, old_logprobs, ref_logprobs, mask, entropy [B, T]; advantages [B].
        old_logprobs=None means on-policy (ratio 1 in value, gradient of logp kept).
        num_sequences / num_tokens: totals over the optimizer batch; None uses this batch's.
        Loss-valued stats (total_loss, policy_loss, kl_penalty, entropy_bonus) use the same
        normalisers, so they too add up over micro-batches; token stats are over valid tokens.
        """
        self._check_inputs(logprobs, old_logprobs, ref_logprobs, advantages, mask, entropy)
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
        ratio = torch.exp(logprobs - old_logprobs)
        surrogate, clip_active, dual_active = clipped_surrogate(
            ratio, advantages.unsqueeze(-1), self.clip_low, self.clip_high, self.dual_clip
        )
        per_token = -surrogate
        kl = None if ref_logprobs is None else kl_k3(logprobs, ref_logprobs)
        if kl is not None:
            per_token = per_token + self.kl_coef * kl
        if entropy is not None:
            per_token = per_token - self.entropy_coef * entropy
        loss = aggregate(per_token)

        with torch.no_grad():
            stats = {"total_loss": loss.item(), "policy_loss": aggregate(-surrogate).item()}
            stats["ratio_mean"], stats["ratio_std"] = _mean_std(ratio[mask])
            stats["advantages_mean"], stats["advantages_std"] = _mean_std(advantages)
            stats["clip_fraction"] = clip_active[mask].double().mean().item()
            if self.dual_clip is not None:
                stats["dual_clip_fraction"] = dual_active[mask].double().mean().item()
            if kl is not None:
                stats["kl_penalty"] = aggregate(self.kl_coef * kl).item()
                stats["kl_mean"], stats["kl_std"] = _mean_std(kl[mask])
            if entropy is not None:
                stats["entropy_bonus"] = aggregate(self.entropy_coef * entropy).item()
                stats["entropy_mean"] = entropy[mask].mean().item()
        return loss, stats
