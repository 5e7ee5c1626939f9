"""What every generation backend is, and the decoding steps they share.

A backend (registered in `grpo.rollout.backends`) samples from one model: `generate(prompt_ids,
prompt_mask, n, settings)` takes left-padded prompt token ids, makes `n` completions of each
with `SamplingSettings`, and returns a `Rollout` whose rows are grouped by prompt; `sync(model)`
makes it sample from `model`'s current weights from then on (after each optimiser step; the
comparison's original model), returning the seconds it took.

A completion ends at EOS, at the settings' stop pattern (e.g. the `#### N` answer line), or at
`max_new_tokens`, in which case it is marked truncated. Its mask covers exactly the tokens the
policy sampled, the EOS included. With `keep_logprobs` the rollout keeps each sampled token's
log-prob under the backend, for the rollout-vs-training correction. A backend outside this
process raises `BackendLost` when it goes away.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from grpo.batch import Rollout
from grpo.model.loading import Policy
from grpo.rollout.settings import SamplingSettings


class BackendLost(RuntimeError):
    """The backend cannot generate any more (a vLLM server went away): one line naming what was
    lost. The run's own state is whole, so the trainer stops with a checkpoint."""


class Backend(ABC):
    """A generation backend on `policy` (see the module docstring)."""

    # Ranks that drive one engine together (vLLM's tensor parallel): they must call `generate`
    # equally often.
    ranks_per_engine: int = 1

    def __init__(self, policy: Policy, settings: SamplingSettings) -> None:
        self.model, self.tokenizer = policy.model, policy.tokenizer

    @abstractmethod
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        settings: SamplingSettings,
    ) -> Rollout:
        """`n` completions of each prompt, rows grouped by prompt."""

    def sync(self, model: PreTrainedModel) -> float:
        """Sample from `model` from now on. Backends in this process read its weights as they
        are, so this costs nothing."""
        self.model = model
        return 0.0


class StopOnPattern(StoppingCriteria):
    """Stops each row once its completion text matches `pattern`; remembers where."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pattern: str, prompt_len: int):
        self.tokenizer, self.pattern, self.prompt_len = tokenizer, re.compile(pattern), prompt_len
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            if row in self.stopped_at:
                done[row] = True
                continue
            text = self.tokenizer.decode(
                input_ids[row, self.prompt_len :], skip_special_tokens=True
            )
            if self.pattern.search(text):
                self.stopped_at[row] = input_ids.shape[1] - self.prompt_len
                done[row] = True
        return done


def decoded_rollout(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sequences: torch.Tensor,
    stop: StopOnPattern | None,
    logprobs: torch.Tensor | None,
) -> Rollout:
    """A `Rollout` from decoded `sequences` (N, P + T), prompts (N, P) included: each completion
    cut after its first EOS or where `stop` matched, the rest padded, texts decoded."""
    completion_ids = sequences[:, prompt_ids.shape[1] :]
    lengths, truncated = _completion_lengths(
        completion_ids, tokenizer.eos_token_id, stop.stopped_at if stop else {}
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    completion_mask = (positions[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    if logprobs is not None:
        logprobs = torch.where(completion_mask.bool(), logprobs, 0.0)
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        truncated,
        texts,
        tokenizer.pad_token_id,
        logprobs,
    )


def _completion_lengths(
    completion_ids: torch.Tensor, eos_token_id: int, stopped_at: dict[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: tokens up to and including the first EOS or the stop point; and truncation."""
    n, t = completion_ids.shape
    is_eos = completion_ids == eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((n,), t + 1))
    stops = torch.tensor([stopped_at.get(i, t + 1) for i in range(n)], device=first_eos.device)
    ends = torch.minimum(first_eos.to(stops.device), stops)
    return ends.clamp(max=t), ends > t


def listed_rollout(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    n: int,
    tokens: list[list[int]],
    truncated: list[bool],
    logprobs: list[list[float]] | None = None,
    from_model: list[list[int]] | None = None,
) -> Rollout:
    """Completions given as token-id lists (`n` per prompt, rows grouped by prompt) as a
    `Rollout`: right-padded, prompts repeated, texts decoded; with their per-token `logprobs`
    (an engine's) and `from_model` (1 on the model's tokens: a trajectory's loss mask)."""
    width = max(1, max(len(row) for row in tokens))

    def padded(rows: list[list[Any]], dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
        return out

    ids = padded(tokens, torch.long, tokenizer.pad_token_id)
    device = prompt_ids.device
    return Rollout(
        prompt_ids.repeat_interleave(n, 0),
        prompt_mask.repeat_interleave(n, 0),
        ids.to(device),
        padded([[1] * len(row) for row in tokens], torch.long).to(device),
        torch.tensor(truncated, device=device),
        tokenizer.batch_decode(ids, skip_special_tokens=True),
        tokenizer.pad_token_id,
        None if logprobs is None else padded(logprobs, torch.float32).to(device),
        None if from_model is None else padded(from_model, torch.long).to(device),
    )
