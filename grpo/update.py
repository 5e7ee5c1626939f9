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
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grpo import distributed
from grpo.logprobs import SharedPrompts, batch_logprobs, micro_batches
from grpo.loss import GRPOLoss
from grpo.modeling import Policy
from grpo.rollout import Rollout
from grpo.validation import ConfigError

# Loss-valued statistics add up over micro-batches (same normalisers); the others are averages.
ADDITIVE_STATS = ("total_loss", "policy_loss", "kl_penalty", "entropy_bonus")


class Reference:
    """The reference policy's log-probs (no gradient), optionally refreshed from the policy.

    Every `every` steps (0 = never) the reference becomes ref + mix * (policy - ref):
    mix = 1 resets it to the policy (DeepSeekMath Algorithm 1, outer loop), 0 < mix < 1 is
    TR-DPO's soft update (Gorbatovski et al. 2024, arXiv 2404.09656). Needs full fine-tuning: with
    LoRA the reference is the base model with the adapters off, which has nothing to update.

    `offload` (full fine-tuning): the frozen copy's weights live in a temporary safetensors file
    between uses and are memory-mapped for each forward pass (`weights`), so the policy update,
    the step's memory peak, runs with one model copy less in memory; each step reads the weights
    back from the OS page cache (or the disk, if the kernel evicted them).
    """

    def __init__(
        self,
        policy: Policy,
        temperature: float,
        every: int = 0,
        mix: float = 1.0,
        offload: bool = False,
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
        if offload and policy.uses_lora:
            raise ConfigError(
                "trainer.offload_reference=true: with LoRA the reference is the base model with "
                "the adapters off, there is no copy to offload; set it to false"
            )
        self.policy, self.temperature = policy, temperature
        self.every, self.mix = every, mix
        self._file: _WeightFile | None = None
        if policy.uses_lora:
            self.model, self._switch_off = policy.model, policy.model.disable_adapter
        else:
            self.model = copy.deepcopy(policy.model).eval().requires_grad_(False)
            self._switch_off = nullcontext
            if offload:
                self._file = _WeightFile(self.model)

    def weights(self, changes: bool = False) -> AbstractContextManager:
        """Within: the reference's weights are in memory (a no-op unless offloaded);
        `changes`: they are written back to the file on exit."""
        return nullcontext() if self._file is None else self._file.loaded(changes)

    @torch.no_grad()
    def __call__(
        self, rollout: Rollout, batch_size: int | None = None, share_prompts: bool = True
    ) -> torch.Tensor:
        """[N, T] log-probs of `rollout`'s completions, `batch_size` rows a pass (all)."""
        was_training = self.model.training
        self.model.eval()
        with self._switch_off(), self.weights():
            size = batch_size or len(rollout.completion_ids)
            logp = batch_logprobs(self.model, rollout, self.temperature, size, share_prompts)
        self.model.train(was_training)
        return logp

    @torch.no_grad()
    def maybe_update(self, step: int) -> None:
        """After optimiser step `step`: mix the policy into the reference if one is due."""
        if not self.every or step % self.every:
            return
        with self.weights(changes=True):
            pairs = zip(self.model.parameters(), self.policy.model.parameters(), strict=True)
            for ref, current in pairs:
                ref.lerp_(current, self.mix)  # exact copy at mix = 1


class _WeightFile:
    """A module's parameters kept in a temporary safetensors file, in memory only in `loaded`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = dict(module.named_parameters())  # tied weights once
        self.device = next(iter(self.params.values())).device
        folder = tempfile.mkdtemp(prefix="grpo-reference-")  # $TMPDIR
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.path = Path(folder) / "reference.safetensors"
        self._save()
        self._free()

    def _save(self) -> None:  # a new file, not over the one that may still be mapped
        tmp = self.path.with_suffix(".tmp")
        save_file({name: p.data.contiguous() for name, p in self.params.items()}, tmp)
        os.replace(tmp, self.path)

    def _free(self) -> None:
        for p in self.params.values():
            p.data = p.data.new_empty(0)

    @contextmanager
    def loaded(self, changes: bool = False) -> Iterator[None]:
        weights = load_file(self.path, device=str(self.device))  # memory-mapped on CPU
        for name, p in self.params.items():
            p.data = weights[name].clone() if changes else weights[name]
        try:
            yield
        finally:
            if changes:
                self._save()
            self._free()


def make_reference(
    policy: Policy, temperature: float, every: int = 0, mix: float = 1.0, offload: bool = False
) -> Reference:
    """The reference policy for the KL term; see `Reference`."""
    return Reference(policy, temperature, every, mix, offload)


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
    inference_batch_size: int | None = None,
    share_prompts: bool = True,
) -> dict[str, float]:
    """`epochs` passes over the batch, each `num_mini_batches` optimiser steps (see module doc).

    Reference (and, with several steps, old) log-probs are computed once, before the first step,
    in eval mode like the sampling, `inference_batch_size` completions a pass (None: the micro-
    batch size). `share_prompts`: each group's prompt runs once for its completions
    (`grpo.logprobs.SharedPrompts`; not with FSDP). Returns the loss statistics and `grad_norm`
    averaged over the optimiser steps taken, and `optimizer_steps`. A mini-batch without loss
    tokens (all masked) takes no step.
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
    no_grad_size = inference_batch_size or micro_batch_size
    ref = None if reference is None else reference(rollout, no_grad_size, share_prompts)
    old = None
    if epochs * num_mini_batches > 1:
        model.eval()
        old = batch_logprobs(model, rollout, temperature, no_grad_size, share_prompts)
    size = n // num_mini_batches
    steps = []
    model.train()
    for _ in range(epochs):
        for start in range(0, n, size):
            rows = slice(start, start + size)
            norm = normalisers(mask[rows])
            if not norm["num_tokens"]:  # on any rank
                continue
            steps.append(
                _optimizer_step(
                    model,
                    rollout.rows(rows),
                    advantages[rows],
                    mask[rows],
                    norm,
                    None if old is None else old[rows],
                    None if ref is None else ref[rows],
                    loss_fn,
                    optimizer,
                    micro_batch_size,
                    max_grad_norm,
                    temperature,
                    share_prompts,
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
    norm: dict[str, int],
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    loss_fn: GRPOLoss,
    optimizer: torch.optim.Optimizer,
    micro_batch_size: int,
    max_grad_norm: float | None,
    temperature: float,
    share_prompts: bool,
) -> dict[str, float]:
    """Accumulate gradients over micro-batches, clip, and take one optimiser step.

    The loss is normalised by the whole (mini-)batch's counts `norm` (`normalisers`), so the
    summed micro-batch gradients equal the full-batch gradient. Returns the loss statistics
    (additive ones summed, the others averaged weighted by loss tokens) and `grad_norm`.
    """
    totals: dict[str, float] = {}
    alone = distributed.world_size() == 1  # several ranks run the same forwards (FSDP)
    for chunk, micro in micro_batches(batch, micro_batch_size):
        if alone and not mask[chunk].any():
            continue  # no loss tokens: a zero gradient, skip the forward passes
        prompts = SharedPrompts(model, batch, chunk, temperature, share_prompts)
        for rows in micro:
            if alone and not mask[rows].any():
                continue
            logp, entropy = prompts.logprobs(
                rows, with_entropy=True, entropy_grad=loss_fn.entropy_coef > 0
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
        prompts.backward()  # the micro-batches' gradients through the shared prompt pass
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
