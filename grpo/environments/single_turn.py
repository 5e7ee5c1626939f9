"""The trivial environment: one model turn, nothing appended (`environment=single_turn`, the
default). With it the rollout source takes the one-call path (`Backend.generate`), so a plain
task trains exactly as it did before environments existed."""

from __future__ import annotations

from grpo.environments.base import ENVIRONMENTS, Environment, Episode
from grpo.tasks.base import Row


class _Done(Episode):
    """An episode that ends after the first turn."""

    def step(self, turn: str) -> None:
        return None


@ENVIRONMENTS.register("single_turn")
class SingleTurn(Environment):
    """One turn per trajectory: the completion is the trajectory."""

    max_turns = 1

    def reset(self, row: Row) -> Episode:
        return _Done()
