"""What an environment is: the other side of a multi-turn rollout.

The interface is the peers' (verifiers' `MultiTurnEnv`, SkyRL's `Env.init/step`, OpenRLHF's
`AgentInstanceBase.reset/step`), cut to what a text protocol needs:
- `Environment.reset(row) -> Episode`: one per trajectory (the G trajectories of a prompt each
  get their own), before its first model turn; the first prompt is the task's;
- `Episode.step(turn) -> str | None`: the text the model just generated in this turn (its own
  tokens decoded) -> the observation appended to the trajectory as tokens (tool output), or
  None when the trajectory is done;
- `Episode.stats()`: per-trajectory counts for the metrics (tool calls, errors, ...).
- `Environment.close()`: releases what the environment holds (a sandbox's processes), once,
  when the run ends.

A model turn ends at EOS, at the task's stop pattern, at the environment's `turn_stop` pattern
(e.g. the opening of a tool's output fence), or at `rollout.max_new_tokens`; after
`max_turns` model turns the trajectory ends whatever the episode says. The reward is the task's,
computed on the whole trajectory's text. Environments are registered in `ENVIRONMENTS` by name
and picked with `environment=NAME` (conf/environment/NAME.yaml); `single_turn` is the trivial
one, so training has one path. An environment's settings (its YAML's keys besides `name`) are
the keyword-only parameters of its constructor, checked against the registry before any model
loads; `max_turns`, when it has one, is `environment.max_turns`.

The multi-turn driver (`grpo.rollout.multiturn`) adds `turns` to each trajectory's stats;
`stat_means` turns a batch's stats into the numbers logged per step and in evaluation
(`env/<name>`, `eval/env/<name>`), with `used_tool` where the episodes count `tool_calls`.
Imports nothing above the tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from grpo.registry import Registry
from grpo.tasks.base import Row

ENVIRONMENTS = Registry("environment")
# The `Episode.stats()` key that counts a trajectory's tool calls; it "used the tool" when > 0.
TOOL_CALLS = "tool_calls"
# The `Episode.stats()` key that, when 1, leaves the trajectory out of the loss (its loss mask
# all 0: no token, no sequence in any normaliser), its reward still in its group's statistics
# (SimpleTIR's void-turn filter).
DROPPED = "dropped"


class Episode(ABC):
    """One trajectory's environment state."""

    @abstractmethod
    def step(self, turn: str) -> str | None:
        """The model's latest turn (its text) -> the observation to append, or None: done."""

    def stats(self) -> dict[str, float]:
        """This trajectory's counts, logged as `env/<name>` means (none by default); every
        episode of an environment gives the same keys."""
        return {}


class Environment(ABC):
    """Makes an `Episode` per trajectory; `max_turns` caps the model turns of one."""

    max_turns: int = 1
    turn_stop: str | None = None  # a regex that also ends a model turn (None: the task's only)
    # None: an observation is text appended as it is; "tool": it is a tool message's content,
    # which the chat template writes (grpo.rollout.chat_tools; the template must be
    # prefix-preserving), with `tools` (JSON schemas) in the prompt's template.
    observation_role: str | None = None
    tools: list[dict] | None = None

    @abstractmethod
    def reset(self, row: Row) -> Episode:
        """A fresh episode for a trajectory on `row`."""

    def close(self) -> None:  # noqa: B027  (an optional hook: most hold nothing)
        """Release what the environment holds (a sandbox's processes); nothing by default.
        The trainer calls it once, when the run ends."""


def used_tool(stats: dict[str, list[float]]) -> list[bool] | None:
    """Per trajectory, whether it called a tool; None when the episodes count no tool calls."""
    if TOOL_CALLS not in stats:
        return None
    return [calls > 0 for calls in stats[TOOL_CALLS]]


def stat_means(stats: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each per-trajectory stat (one value per trajectory), and `used_tool`: the
    fraction of trajectories that called a tool, where the episodes count tool calls."""
    means = {name: sum(values) / max(len(values), 1) for name, values in stats.items()}
    used = used_tool(stats)
    if used is not None:
        means["used_tool"] = sum(used) / max(len(used), 1)
    return means
