"""Policy updates on a scored rollout, and the reference policy.

`policy_update` is the inner loop of DeepSeekMath (arXiv 2402.03300) Algorithm 1: mu = `epochs`
passes over the generated batch, each in `num_mini_batches` optimiser steps, gradients
accumulated over micro-batches. With one optimiser step in all, the "old" policy is the current
one: the loss uses the detached current log-probs (ratios 1 in value, the clip never binds) and
no extra forward pass is made. With more, the old log-probs are computed once, before the first
step, so later steps see how far the policy has moved and the clip engages.

The reference policy is the frozen starting model. With LoRA it is the same base with the
adapters switched off (no second copy in memory); for full fine-tuning, a frozen copy, which can
be moved towards the policy every N steps (`Reference.maybe_update`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from grpo import distributed
from grpo.loss import GRPOLoss
from grpo.modeling import Policy
from grpo.rollout import Rollout, token_logprobs
from grpo.validation import ConfigError

# Loss-valued statistics add up over micro-batches (same normalisers); the others are averages.
ADDITIVE_STATS = ("total_loss", "policy_loss", "kl_penalty", "entropy_bonus")


class Reference:
    """The reference policy's log-probs (no gradient), optionally refreshed from the policy.

    Every `every` steps (0 = never) the reference becomes ref + mix * (policy - ref):
    mix = 1 resets it to the policy (DeepSeekMath Algorithm 1, outer loop), 0 < mix < 1 is
    TR-DPO's soft update (Gorbatovski et al. 2024, arXiv 2404.09656). Needs full fine-tuning: with
    LoRA the reference is the base model with the adapters off, which has nothing to update.
    """

    def __init__(
        self, policy: Policy, temperature: float, every: int = 0, mix: float = 1.0
    ) -> None:
        if every < 0:
            raise ConfigError(f"algorithm.reference_update.every={every!r}: must be >= 0")
        if not 0 < mix <= 1:
            raise ConfigError(f"algorithm.reference_update.mix={mix!r}: must be in (0, 1]")
        if every and policy.uses_lora:
            raise ConfigError(
                f"algorithm.reference_update.every={every!r}: reference updates need full "
                "fine-tuning (with LoRA the reference is the base model with the adapters off); "
                "set model.lora.enabled=false or algorithm.reference_update.every=0"
            )
        self.policy, self.temperature = policy, temperature
        self.every, self.mix = every, mix
        if policy.uses_lora:
            self.model, self._switch_off = policy.model, policy.model.disable_adapter
        else:
            self.model = copy.deepcopy(policy.model).eval().requires_grad_(False)
            self._switch_off = nullcontext

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        with self._switch_off():
            logp, _ = token_logprobs(self.model, rollout, self.temperature)
        self.model.train(was_training)
        return logp

    @torch.no_grad()
    def maybe_update(self, step: int) -> None:
        """After optimiser step `step`: mix the policy into the reference if one is due."""
        if not self.every or step % self.every:
            return
        pairs = zip(self.model.parameters(), self.policy.model.parameters(), strict=True)
        for ref, current in pairs:
            ref.lerp_(current, self.mix)  # exact copy at mix = 1


def make_reference(
    policy: Policy, temperature: float, every: int = 0, mix: float = 1.0
) -> Reference:
    """The reference policy for the KL term; see `Reference`."""
    return Reference(policy, temperature, every, mix)


def loss_mask(rollout: Rollout, mask_truncated: bool) -> torch.Tensor:
    """Completion tokens that enter the loss: [N, T] bool.

    All sampled tokens, minus those of truncated completions (cut at max_new_tokens) when
    `mask_truncated` (DAPO's overlong filtering, section 3.4).
    """
    mask = rollout.completion_mask.bool()
    if mask_truncated:
        mask = mask & ~rollout.truncated.unsqueeze(1)
    return mask


def normalisers(mask: torch.Tensor) -> dict[str, int]:
    """The loss normalisers of one optimiser step: completions with tokens, and tokens.

    The one place they are computed. Summed over ranks: with data parallelism they count the
    global batch, so each rank's loss is its part of the global batch's loss.
    """
    counts = {"num_sequences": int(mask.any(1).sum()), "num_tokens": int(mask.sum())}
    return distributed.sum_over_ranks(counts)


@torch.no_grad()
def _logprobs_in_chunks(
    logprobs: Callable[[Rollout], torch.Tensor], rollout: Rollout, chunk: int
) -> torch.Tensor:
    """[N, T] log-probs of a whole rollout, computed `chunk` rows at a time."""
    n = rollout.completion_ids.shape[0]
    return torch.cat([logprobs(rollout.rows(slice(s, s + chunk))) for s in range(0, n, chunk)])


def policy_update(
    policy: Policy,
    rollout: Rollout,
    advantages: torch.Tensor,
    loss_fn: GRPOLoss,
    optimizer: torch.optim.Optimizer,
    reference: Reference | None,
    micro_batch_size: int,
    max_grad_norm: float | None,
    temperature: float,
    epochs: int = 1,
    num_mini_batches: int = 1,
    mask_truncated: bool = False,
) -> dict[str, float]:
    """`epochs` passes over the batch, each `num_mini_batches` optimiser steps (see module doc).

    Reference (and, with several steps, old) log-probs are computed once, before the first step,
    in eval mode like the sampling. Returns the loss statistics and `grad_norm` averaged over the
    optimiser steps taken, and `optimizer_steps`. A mini-batch without loss tokens (all masked)
    takes no step.
    """
    n = rollout.completion_ids.shape[0]
    if epochs < 1:
        raise ConfigError(f"algorithm.update_epochs={epochs!r}: must be >= 1")
    if num_mini_batches < 1 or n % num_mini_batches:
        raise ConfigError(
            f"algorithm.num_mini_batches={num_mini_batches!r}: must divide the {n} completions "
            "of a batch"
        )
    model = policy.model
    mask = loss_mask(rollout, mask_truncated)
    ref = None if reference is None else _logprobs_in_chunks(reference, rollout, micro_batch_size)
    old = None
    if epochs * num_mini_batches > 1:
        model.eval()

        def sampling_policy(micro: Rollout) -> torch.Tensor:
            return token_logprobs(model, micro, temperature)[0]

        old = _logprobs_in_chunks(sampling_policy, rollout, micro_batch_size)
    size = n // num_mini_batches
    steps = []
    model.train()
    for _ in range(epochs):
        for start in range(0, n, size):
            rows = slice(start, start + size)
            if not normalisers(mask[rows])["num_tokens"]:  # on any rank
                continue
            steps.append(
                _optimizer_step(
                    model,
                    rollout.rows(rows),
                    advantages[rows],
                    mask[rows],
                    None if old is None else old[rows],
                    None if ref is None else ref[rows],
                    loss_fn,
                    optimizer,
                    micro_batch_size,
                    max_grad_norm,
                    temperature,
                )
            )
    model.eval()
    stats = {key: sum(s[key] for s in steps) / len(steps) for key in (steps[0] if steps else {})}
    return {**stats, "optimizer_steps": float(len(steps))}


def _optimizer_step(
    model: torch.nn.Module,
    batch: Rollout,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    loss_fn: GRPOLoss,
    optimizer: torch.optim.Optimizer,
    micro_batch_size: int,
    max_grad_norm: float | None,
    temperature: float,
) -> dict[str, float]:
    """Accumulate gradients over micro-batches, clip, and take one optimiser step.

    The loss is normalised by the whole (mini-)batch's counts (`normalisers`), so the summed
    micro-batch gradients equal the full-batch gradient. Returns the loss statistics (additive
    ones summed, the others averaged weighted by loss tokens) and `grad_norm`.
    """
    norm = normalisers(mask)
    totals: dict[str, float] = {}
    for start in range(0, batch.completion_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        if not mask[rows].any() and distributed.world_size() == 1:  # ranks: same forwards (FSDP)
            continue  # no loss tokens: a zero gradient, skip the forward pass
        logp, entropy = token_logprobs(
            model,
            batch.rows(rows),
            temperature,
            with_entropy=True,
            entropy_grad=loss_fn.entropy_coef > 0,
        )
        loss, stats = loss_fn(
            logp,
            None if old is None else old[rows],
            None if ref is None else ref[rows],
            advantages[rows],
            mask[rows],
            entropy=entropy,
            **norm,
        )
        loss.backward()
        weight = float(mask[rows].sum()) / norm["num_tokens"]
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + (
                value if key in ADDITIVE_STATS else value * weight if weight else 0.0
            )
    totals = distributed.sum_over_ranks(totals)  # the ranks' parts add up to the global batch's
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.sum_gradients(params)  # the ranks' parts add up to the global batch's gradient
    limit = max_grad_norm if max_grad_norm is not None else math.inf
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, limit))
    if not math.isfinite(totals["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm; loss stats: {totals}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals
