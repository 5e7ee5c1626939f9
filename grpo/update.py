"""One policy update on a scored rollout: log-probs, loss, backward over micro-batches, step.

The reference policy is the frozen starting model. With LoRA it is the same base with the
adapters switched off (no second copy in memory); for full fine-tuning, a frozen copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from grpo.loss import GRPOLoss
from grpo.modeling import Policy
from grpo.rollout import Rollout, token_logprobs

ADDITIVE_STATS = ("total_loss", "policy_loss", "kl_penalty")

Reference = Callable[[Rollout], torch.Tensor]


def make_reference(policy: Policy, temperature: float) -> Reference:
    """A function giving the reference policy's log-probs (no gradient) for a rollout."""
    if policy.uses_lora:
        model, switch_off = policy.model, policy.model.disable_adapter
    else:
        model = copy.deepcopy(policy.model).eval().requires_grad_(False)
        switch_off = nullcontext

    @torch.no_grad()
    def reference(rollout: Rollout) -> torch.Tensor:
        was_training = model.training
        model.eval()
        with switch_off():
            logp, _ = token_logprobs(model, rollout, temperature)
        model.train(was_training)
        return logp

    return reference


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
) -> dict[str, float]:
    """Accumulate gradients over micro-batches, clip, and take one optimiser step.

    The loss is normalised by the whole batch's sequence and token counts, so the summed
    micro-batch gradients equal the full-batch gradient. Returns the loss statistics
    (additive ones summed, the others averaged weighted by valid tokens) and `grad_norm`.
    """
    model = policy.model
    model.train()
    n = rollout.completion_ids.shape[0]
    num_tokens = int(rollout.completion_mask.sum())
    totals: dict[str, float] = {}
    for start in range(0, n, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        micro = rollout.rows(rows)
        logp, entropy = token_logprobs(model, micro, temperature, with_entropy=True)
        ref = reference(micro) if reference is not None else None
        loss, stats = loss_fn(
            logp,
            None,
            ref,
            advantages[rows],
            micro.completion_mask,
            entropy=entropy,
            num_sequences=n,
            num_tokens=num_tokens,
        )
        loss.backward()
        weight = float(micro.completion_mask.sum()) / max(num_tokens, 1)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + (
                value if key in ADDITIVE_STATS else value * weight
            )
    params = [p for p in model.parameters() if p.requires_grad]
    limit = max_grad_norm if max_grad_norm is not None else math.inf
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, limit))
    if not math.isfinite(totals["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm; loss stats: {totals}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return totals
