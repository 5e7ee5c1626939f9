"""The multi-turn driver: model turns interleaved with an environment's observations, as one
`Rollout` whose completions are whole trajectories.

The protocol, for a batch of prompts and one `Episode` per trajectory (grouped by prompt):
1. turn 1 is the backend's usual call: `n` completions of each prompt, one prefill per prompt;
2. each trajectory whose turn was complete (not cut at a budget) hands the turn's text to its
   episode: `Episode.step(text)` -> an observation, or None (done); the episode decides, after
   an EOS too (a chat template ends each assistant turn with one). The observation is
   tokenized alone (no special tokens) and its ids appended to the trajectory: the sampled ids
   are never decoded and tokenized again, which would drift from what the model sampled (TRL,
   verl, SkyRL and OpenRLHF append ids the same way);
3. the next turn generates for the trajectories still going, each prompted with its first
   prompt's ids followed by every completion id so far (left-padded as a new batch, n = 1), and
   so on: trajectories end at different turns, the batch goes on with the rest.

A model turn ends at EOS, at the task's stop pattern or the environment's `turn_stop` (one regex:
`turn_stop_pattern`), or at its budget. Budgets: each model turn at most `max_new_tokens`; the
whole completion (model turns and observations) at most `max_total_tokens`
(`SamplingSettings.trajectory_tokens`). What is cut, each marking the trajectory truncated and
ending it: a model turn that reaches its budget (the turn's tokens up to it are kept; its
episode is not stepped); an observation that does not fit in what is left of the total (its
first tokens that fit are kept); an observation when the trajectory has had `max_turns` model
turns (dropped: the model asked for more turns than it may take). A continuation's prompt is
the first prompt (already cut to `max_prompt_length`) and the trajectory, never cut: a backend
holds at most `SamplingSettings.context_length` tokens per row.

The rollout's `loss_mask` is 1 on the model's tokens and 0 on the observations' (which get no
log-prob and enter no loss); its `sampling_logprobs` (when kept) are the backend's on model
tokens and 0 on the others; its `texts` are the whole trajectories decoded. The driver also
returns per-trajectory stats: `turns` (model turns) and each key of `Episode.stats()`; a
trajectory whose episode reports `dropped` = 1 gets a loss mask of zeros (SimpleTIR's filter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from grpo.batch import Rollout
from grpo.environments.base import DROPPED, Episode
from grpo.rollout.base import Backend, listed_rollout
from grpo.rollout.settings import SamplingSettings

# (the model's turn text, an observation) -> the text appended after the turn
Written = Callable[[str, str], str]


def turn_stop_pattern(task_stop: str | None, turn_stop: str | None) -> str | None:
    """The regex that ends a model turn: the task's stop pattern or the environment's."""
    either = [f"(?:{pattern})" for pattern in (task_stop, turn_stop) if pattern]
    return "|".join(either) or None


@dataclass
class Trajectory:
    """One trajectory being built: its prompt's ids and, per completion token, its id, whether
    the model sampled it, and its log-prob under the backend (0 for the environment's)."""

    prompt: list[int]
    episode: Episode
    room: int  # completion tokens it may still take
    ids: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    truncated: bool = False
    done: bool = False

    def add(self, ids: list[int], from_model: bool, logprobs: list[float] | None = None) -> None:
        """Append tokens (the model's or the environment's), taking them from `room`."""
        self.ids += ids
        self.model += [int(from_model)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.room -= len(ids)

    def end(self, truncated: bool) -> None:
        self.done, self.truncated = True, truncated

    def take_turn(
        self,
        turn: tuple[list[int], list[float] | None, bool, str],
        max_turns: int,
        tokenizer: PreTrainedTokenizerBase,
        written: Written | None = None,
    ) -> None:
        """Append a model turn (ids, log-probs, cut at the call's budget, text) and, when it is
        complete, its episode's observation (as `written` writes it after the turn, if given);
        end the trajectory where the module docstring says."""
        ids, logprobs, cut, text = turn
        cut = cut or len(ids) > self.room
        ids = ids[: self.room]
        self.add(ids, True, logprobs[: len(ids)] if logprobs is not None else None)
        self.turns += 1
        if cut:
            return self.end(truncated=True)
        observation = self.episode.step(text)
        if observation is None or self.turns >= max_turns:
            return self.end(truncated=observation is not None)
        if written is not None:
            observation = written(text, observation)
        tokens = tokenizer(observation, add_special_tokens=False).input_ids
        fits = tokens[: self.room]
        self.add(fits, False)
        if self.room == 0:  # cut, or nothing left for a model turn
            self.end(truncated=True)


def run_trajectories(
    backend: Backend,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    n: int,
    settings: SamplingSettings,
    episodes: Sequence[Episode],
    max_turns: int,
    turn_stop: str | None,
    written: Written | None = None,
) -> tuple[Rollout, dict[str, list[float]]]:
    """`n` trajectories of each left-padded prompt, `episodes[i]` answering trajectory i (rows
    grouped by prompt), as in the module docstring; returns the rollout and the per-trajectory
    stats (`turns` and the episodes' own). `written(turn, observation)`: the text appended for
    an observation (None: the observation itself; a chat template's tool message:
    `grpo.rollout.chat_tools`)."""
    stop = turn_stop_pattern(settings.stop_pattern, turn_stop)
    turn_settings = dataclasses.replace(settings, stop_pattern=stop)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    trajectories = [
        Trajectory(prompts[i // n], episode, settings.trajectory_tokens)
        for i, episode in enumerate(episodes)
    ]
    active, ids, mask, copies = trajectories, prompt_ids, prompt_mask, n
    while active:
        budget = max(min(settings.max_new_tokens, t.room) for t in active)
        rollout = backend.generate(
            ids, mask, copies, dataclasses.replace(turn_settings, max_new_tokens=budget)
        )
        for trajectory, turn in zip(active, model_turns(rollout), strict=True):
            trajectory.take_turn(turn, max_turns, tokenizer, written)
        active = [t for t in active if not t.done]
        if active:
            ids, mask = left_padded([t.prompt + t.ids for t in active], tokenizer, ids.device)
            copies = 1
    stats = {"turns": [float(t.turns) for t in trajectories]}
    counts = [episode.stats() for episode in episodes]  # once each: the same keys in all
    stats |= {name: [float(c[name]) for c in counts] for name in (counts[0] if counts else ())}
    dropped = stats.get(DROPPED, [0.0] * len(trajectories))
    for trajectory, drop in zip(trajectories, dropped, strict=True):
        if drop:  # out of the loss (SimpleTIR's filter); its reward stays in its group
            trajectory.model = [0] * len(trajectory.model)
    rollout = trajectory_rollout(
        trajectories, tokenizer, prompt_ids, prompt_mask, n, settings.keep_logprobs
    )
    return rollout, stats


def model_turns(
    rollout: Rollout,
) -> list[tuple[list[int], list[float] | None, bool, str]]:
    """Each row of a generated turn: its token ids, their log-probs (None when not kept),
    whether it was cut at the budget, and its text."""
    turns = []
    for row in range(len(rollout.texts)):
        keep = rollout.completion_mask[row].bool()
        logprobs = None
        if rollout.sampling_logprobs is not None:
            logprobs = rollout.sampling_logprobs[row][keep].tolist()
        ids = rollout.completion_ids[row][keep].tolist()
        turns.append((ids, logprobs, bool(rollout.truncated[row]), rollout.texts[row]))
    return turns


def left_padded(
    rows: list[list[int]], tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a left-padded batch (ids, mask) on `device`."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def trajectory_rollout(
    trajectories: list[Trajectory],
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    n: int,
    keep_logprobs: bool,
) -> Rollout:
    """The finished trajectories as one `Rollout`: completions right-padded, `loss_mask` on the
    model's tokens, the backend's log-probs on them (with `keep_logprobs`), texts decoded."""
    return listed_rollout(
        tokenizer,
        prompt_ids,
        prompt_mask,
        n,
        [t.ids for t in trajectories],
        [t.truncated for t in trajectories],
        [t.logprobs for t in trajectories] if keep_logprobs else None,
        [t.model for t in trajectories],
    )
