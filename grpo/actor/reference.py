"""The reference policy: the frozen starting model that the KL term compares against.

With LoRA it is the same base with the adapters switched off (no second copy in memory); for
full fine-tuning, a frozen copy, which can be moved towards the policy every N steps
(`Reference.maybe_update`) and can wait in a temporary file between its forward passes
(`offload`).
"""

from __future__ import annotations

import copy
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
from grpo.actor.logprobs import batch_logprobs
from grpo.batch import Rollout
from grpo.model.loading import Policy


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

    The settings are checked before anything loads (`grpo.run.config`): with LoRA, `every` is 0
    and `offload` false.
    """

    def __init__(
        self,
        policy: Policy,
        temperature: float,
        every: int = 0,
        mix: float = 1.0,
        offload: bool = False,
    ) -> None:
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
            logp, _ = batch_logprobs(self.model, rollout, self.temperature, size, share_prompts)
        self.model.train(was_training)
        return logp

    @torch.no_grad()
    def maybe_update(self, step: int) -> None:
        """After optimiser step `step`: mix the policy into the reference if one is due."""
        if not self.every or step % self.every:
            return
        with self.weights(changes=True), distributed.gathered(self.policy.model):
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
