"""The actor: the policy update on a scored rollout, DeepSeekMath (arXiv 2402.03300) Algorithm 1,
inner loop.

`Actor.score` scores the rollout before any step, without gradient: the reference policy's
log-probs (for the KL), and the sampling ("old") policy's when the loss needs them (several
optimiser steps, the KL in the reward, top-entropy token selection). `Actor.update` then makes
mu = `epochs` passes over the batch, each in `num_mini_batches` optimiser steps, gradients
accumulated over micro-batches. With one optimiser step in all, the "old" policy is the current
one: the loss uses the detached current log-probs (ratios 1 in value, the clip never binds) and
no extra forward pass is made. With more, later steps see how far the policy has moved and the
clip engages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from grpo import distributed, heap
from grpo.actor.logprobs import SharedPrompts, batch_logprobs, can_pack, micro_batches, rows_of
from grpo.actor.reference import Reference
from grpo.algorithm.kl import sequence_kl_penalty
from grpo.algorithm.loss import GRPOLoss
from grpo.batch import Rollout, take
from grpo.model.loading import Policy

# Loss-valued statistics add up over micro-batches (same normalisers); the others are averages.
ADDITIVE_STATS = ("total_loss", "policy_loss", "kl_penalty", "entropy_bonus")


@dataclass
class TokenScores:
    """Per-token numbers computed before the update, [N, T] each (None: not needed)."""

    old: torch.Tensor | None = None  # the sampling policy's log-probs
    ref: torch.Tensor | None = None  # the reference policy's log-probs
    selected: torch.Tensor | None = None  # tokens that get policy gradient (top entropy)


@dataclass(frozen=True)
class UpdateSettings:
    """How the actor runs its passes (`trainer.*`, `algorithm.*`; see conf/ for each)."""

    temperature: float  # log-probs at the sampling temperature (rollout.temperature)
    micro_batch_size: int  # completions per forward/backward pass of the update
    micro_batch_tokens: int | None  # instead: micro-batches of at most this many tokens
    inference_batch_size: int  # completions per no-grad pass (reference, old policy)
    share_prompts: bool  # each group's prompt runs once for its completions
    max_grad_norm: float | None  # gradient clipping (None: off)
    epochs: int = 1  # mu: passes over the batch
    num_mini_batches: int = 1  # optimiser steps per pass
    mask_truncated: bool = False  # DAPO's overlong filtering
    need_old: bool = False  # the old policy's log-probs: several steps, or the KL in the reward
    engine_as_old: bool = False  # pi_old = the engine's log-probs (algorithm.old_logprobs=engine)
    keep_freed_memory: bool = False  # micro-batches reuse freed memory (grpo.heap.kept)


class Actor:
    """The policy's training side: no-grad scoring, then the update (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        reference: Reference | None,
        loss_fn: GRPOLoss,
        optimizer: torch.optim.Optimizer,
        settings: UpdateSettings,
    ) -> None:
        self.policy, self.reference, self.loss_fn = policy, reference, loss_fn
        self.optimizer, self.settings = optimizer, settings

    def score(self, rollout: Rollout) -> TokenScores:
        """The reference's log-probs, and the current (sampling) policy's when the update needs
        them or the loss selects top-entropy tokens: eval mode like the sampling."""
        s, loss_fn = self.settings, self.loss_fn
        scores = TokenScores()
        if self.reference is not None:
            scores.ref = self.reference(rollout, s.inference_batch_size, s.share_prompts)
        if s.need_old or loss_fn.selects_tokens:
            self.policy.model.eval()
            with torch.no_grad():
                scores.old, entropy = batch_logprobs(
                    self.policy.model,
                    rollout,
                    s.temperature,
                    s.inference_batch_size,
                    s.share_prompts,
                    with_entropy=loss_fn.selects_tokens,
                )
            if loss_fn.selects_tokens:
                mask = rollout.model_mask.bool()
                scores.selected = top_entropy_tokens(entropy, mask, loss_fn.top_entropy_quantile)
        return scores

    def update(
        self, rollout: Rollout, advantages: torch.Tensor, scores: TokenScores
    ) -> dict[str, float]:
        """`epochs` passes over the batch, each `num_mini_batches` optimiser steps.

        `scores` holds the reference's and, with several steps, the old policy's log-probs
        (`score`). Returns the loss statistics and `grad_norm` averaged over the optimiser steps
        taken, and `optimizer_steps`. A mini-batch without loss tokens (all masked) takes no
        step.
        """
        s = self.settings
        n = rollout.completion_ids.shape[0]
        model = self.policy.model
        mask = loss_mask(rollout, s.mask_truncated)
        size = n // s.num_mini_batches
        steps = []
        model.train()
        with heap.kept(s.keep_freed_memory):  # then given back
            for _ in range(s.epochs):
                for start in range(0, n, size):
                    rows = slice(start, start + size)
                    norm = normalisers(mask[rows])
                    if not norm["num_tokens"]:  # on any rank
                        continue
                    batch = take(rollout, rows)
                    inputs = _per_token_inputs(scores, rollout, rows, s.engine_as_old)
                    steps.append(
                        self._optimizer_step(batch, advantages[rows], mask[rows], norm, inputs)
                    )
        model.eval()
        keys = steps[0] if steps else {}
        stats = {key: sum(step[key] for step in steps) / len(steps) for key in keys}
        return {**stats, "optimizer_steps": float(len(steps))}

    def _optimizer_step(
        self,
        batch: Rollout,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        norm: dict[str, int],
        inputs: dict[str, torch.Tensor | None],
    ) -> dict[str, float]:
        """Accumulate gradients over micro-batches, clip, and take one optimiser step.

        The loss is normalised by the whole (mini-)batch's counts `norm` (`normalisers`), so the
        summed micro-batch gradients equal the full-batch gradient. Returns the loss statistics
        (additive ones summed, the others averaged weighted by loss tokens) and `grad_norm`.
        """
        s, model, loss_fn = self.settings, self.policy.model, self.loss_fn
        totals: dict[str, float] = {}
        alone = distributed.world_size() == 1  # several ranks run the same forwards (FSDP)
        pack = s.share_prompts and can_pack(model)
        plan = micro_batches(batch, s.micro_batch_size, s.micro_batch_tokens, pack)
        for chunk, micro in plan:
            if alone and not mask[chunk].any():
                continue  # no loss tokens: a zero gradient, skip the forward passes
            prompts = SharedPrompts(model, batch, chunk, s.temperature, s.share_prompts)
            for part in micro:
                rows = rows_of(part)
                if alone and not mask[rows].any():
                    continue
                logp, entropy = prompts.logprobs(
                    part, with_entropy=True, entropy_grad=loss_fn.entropy_coef > 0
                )
                micro_inputs = {k: None if v is None else v[rows] for k, v in inputs.items()}
                loss, stats = loss_fn(
                    logp,
                    advantages=advantages[rows],
                    mask=mask[rows],
                    entropy=entropy,
                    **micro_inputs,
                    **norm,
                )
                loss.backward()
                weight = float(mask[rows].sum()) / norm["num_tokens"]
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + (
                        value if key in ADDITIVE_STATS else value * weight if weight else 0.0
                    )
            prompts.backward()  # the micro-batches' gradients through the shared prompt pass
        totals = distributed.sum_over_ranks(totals)  # the ranks' parts add up to the global batch's
        params = [p for p in model.parameters() if p.requires_grad]
        distributed.sum_gradients(params)  # the ranks' parts add up to the global batch's gradient
        limit = s.max_grad_norm if s.max_grad_norm is not None else math.inf
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, limit))
        if not math.isfinite(totals["grad_norm"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm; loss stats: {totals}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals


def top_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """[N, T] bool: the `rho` fraction of valid tokens with the highest entropy over the whole
    batch, all ranks together (Wang et al. 2025, arXiv 2506.01939: rho = 0.2)."""
    values = torch.cat([part.to(entropy.device) for part in distributed.all_gather(entropy[mask])])
    threshold = torch.quantile(values.double(), 1 - rho) if values.numel() else 0.0
    return mask & (entropy >= threshold)


def reward_kl_penalty(scores: TokenScores, rollout: Rollout, kl: Any) -> torch.Tensor:
    """beta * each completion's summed KL estimate, for the whole batch (all ranks' rows in
    order, CPU): subtracted from the rewards when `algorithm.kl.in_reward` (the penalty uses the
    sampling policy's log-probs, so it carries no gradient). Summed over the model's tokens:
    environment tokens have no log-probs."""
    mask = rollout.model_mask.bool()
    mine = sequence_kl_penalty(kl.estimator, scores.old, scores.ref, mask, kl.coef).cpu()
    return torch.cat(distributed.all_gather(mine))


def loss_mask(rollout: Rollout, mask_truncated: bool) -> torch.Tensor:
    """Completion tokens that enter the loss: [N, T] bool. The one place the loss's mask is
    formed: `GRPOLoss` takes it as the valid tokens of every term, aggregation, normaliser,
    rollout correction and statistic.

    The tokens the model sampled (`Rollout.model_mask`: not padding, not the environment's
    tokens of a multi-turn trajectory), minus those of truncated completions (cut at
    max_new_tokens) when `mask_truncated` (DAPO's overlong filtering, section 3.4).
    """
    mask = rollout.model_mask.bool()
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


def _per_token_inputs(
    scores: TokenScores, rollout: Rollout, rows: slice, engine_as_old: bool = False
) -> dict[str, torch.Tensor | None]:
    """The loss's per-token inputs for rows `rows`. `engine_as_old`: the engine's log-probs
    are pi_old (the behaviour policy: TRL AsyncGRPO, prime-rl) and no correction weight is
    formed; else pi_old is the trainer's (the proximal policy of AReaL's decoupled PPO) and
    the engine's log-probs go to the rollout correction (docs/algorithms.md)."""
    old, engine = scores.old, rollout.sampling_logprobs
    if engine_as_old:
        old, engine = engine, None
    per_token = {
        "old_logprobs": old,
        "ref_logprobs": scores.ref,
        "selected": scores.selected,
        "sampling_logprobs": engine,
    }
    return {k: None if v is None else v[rows] for k, v in per_token.items()}
