"""The batch types every stage passes on, and the one way to index and join them.

Rows are completions, grouped by prompt: rows [k*G, (k+1)*G) are the G completions of prompt k.
- `Rollout`: what generation made (token ids and masks, texts, the sampler's log-probs); a
  multi-turn trajectory is one completion whose `loss_mask` marks the tokens the model sampled
  (0 on those an environment inserted, such as tool output);
- `RewardOutput`: what a reward gave (a total per completion and its named parts);
- `ScoredRollout`: a rollout with its data rows, rewards and, for multi-turn trajectories, their
  per-trajectory stats (turns, tool calls, ...).

`take(batch, index)` keeps some rows of any of them (a slice, or a list of row indices) and
`concat(batches)` joins several, padding token tensors on the side each field says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

B = TypeVar("B")
Index = slice | list[int]


def _padded(side: str, value: int | float | str = 0, **kwargs: Any) -> Any:
    """A row-wise token tensor padded on `side` to join batches; `value` or 'pad_token_id'."""
    return field(metadata={"pad": side, "value": value}, **kwargs)


@dataclass
class Rollout:
    """A generated batch: prompt and completion tokens, masks, decoded text."""

    prompt_ids: torch.Tensor = _padded("left", "pad_token_id")  # (N, P), left-padded
    prompt_mask: torch.Tensor = _padded("left")  # (N, P)
    completion_ids: torch.Tensor = _padded("right", "pad_token_id")  # (N, T), right-padded
    completion_mask: torch.Tensor = _padded("right")  # (N, T), 1 on sampled tokens (EOS included)
    truncated: torch.Tensor  # (N,) bool: cut at max_new_tokens
    texts: list[str]  # decoded completions
    pad_token_id: int = field(metadata={"shared": True})  # the padding token
    # (N, T) log-probs of the sampled tokens under the generating engine (None: not kept)
    sampling_logprobs: torch.Tensor | None = _padded("right", 0.0, default=None)
    # (N, T) 1 on completion tokens the model sampled, 0 on tokens an environment inserted (tool
    # output) and on padding (None: every completion token is the model's, one turn). The
    # convention of TRL, verl and SkyRL: environment tokens are context, never loss tokens.
    loss_mask: torch.Tensor | None = _padded("right", 0, default=None)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) completion lengths in tokens, environment tokens included (whole trajectory)."""
        return self.completion_mask.sum(1)

    @property
    def model_mask(self) -> torch.Tensor:
        """(N, T) the completion tokens the model sampled: those that get log-probs and enter
        the loss. Without a `loss_mask`, `completion_mask` itself (the same tensor)."""
        if self.loss_mask is None:
            return self.completion_mask
        return self.completion_mask * self.loss_mask.to(self.completion_mask.dtype)


@dataclass
class RewardOutput:
    """Rewards for a batch: `total[i]` and its breakdown `parts[name][i]` (summing to it)."""

    total: list[float]
    parts: dict[str, list[float]]

    @property
    def part_tensors(self) -> dict[str, torch.Tensor]:
        """Each part as an (N,) float32 tensor."""
        return {name: torch.tensor(v, dtype=torch.float32) for name, v in self.parts.items()}


@dataclass
class ScoredRollout:
    """A rollout with the data row of each completion and its rewards."""

    rows: list[dict[str, Any]]  # the task's data row (question, answer, ...) of each completion
    rollout: Rollout
    scores: RewardOutput
    generate_s: float = field(default=0.0, metadata={"sum": True})  # seconds generating it
    reward_s: float = field(default=0.0, metadata={"sum": True})  # seconds scoring it
    # (N,) the policy version (optimiser updates done) whose weights sampled each completion;
    # None: the current policy's (the synchronous loop). Set by `grpo.rollout.producer`.
    policy_versions: torch.Tensor | None = None
    # per-trajectory numbers of a multi-turn rollout, one value per row: `turns` and each key of
    # the environment's `Episode.stats()` (empty for single-turn completions)
    stats: dict[str, list[float]] = field(default_factory=dict)

    def row_stats(self, row: int) -> dict[str, float]:
        """Row `row`'s per-trajectory stats by name (empty for single-turn completions)."""
        return {name: values[row] for name, values in self.stats.items()}

    @property
    def rewards(self) -> torch.Tensor:
        """(N,) float32 total rewards."""
        return torch.tensor(self.scores.total, dtype=torch.float32)


def take(batch: B, index: Index) -> B:
    """The rows `index` of a batch (a `Rollout`, `RewardOutput`, `ScoredRollout`)."""
    return _take(batch, index)


def _take(value: Any, index: Index) -> Any:
    if dataclasses.is_dataclass(value):
        kept = {}
        for f in dataclasses.fields(value):
            shared = f.metadata.get("shared") or f.metadata.get("sum")
            item = getattr(value, f.name)
            kept[f.name] = item if shared else _take(item, index)
        return type(value)(**kept)
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _take(v, index) for k, v in value.items()}
    if isinstance(index, slice):
        return value[index]
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(index, dtype=torch.long, device=value.device)]
    return [value[i] for i in index]


def concat(batches: list[B]) -> B:
    """One batch from several of the same type, rows in order; token tensors padded to the
    widest on the side their field names (prompts left, completions right)."""
    return _concat(batches, {})


def _concat(values: list[Any], meta: dict[str, Any], owners: list[Any] | None = None) -> Any:
    first = values[0]
    if dataclasses.is_dataclass(first):
        joined = {}
        for f in dataclasses.fields(first):
            items = [getattr(v, f.name) for v in values]
            if f.metadata.get("shared"):
                joined[f.name] = items[0]
            elif f.metadata.get("sum"):
                joined[f.name] = sum(items)
            else:
                joined[f.name] = _concat(items, f.metadata, values)
        return type(first)(**joined)
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values], meta) for k in first}
    if isinstance(first, torch.Tensor):
        if "pad" not in meta:
            return torch.cat(values)
        fill = meta["value"]
        fill = getattr(owners[0], fill) if isinstance(fill, str) else fill
        width = max(v.shape[1] for v in values)
        left = meta["pad"] == "left"
        pads = [(width - v.shape[1], 0) if left else (0, width - v.shape[1]) for v in values]
        return torch.cat([F.pad(v, p, value=fill) for v, p in zip(values, pads, strict=True)])
    return [item for value in values for item in value]
