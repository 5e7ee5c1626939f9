"""Environments for multi-turn rollouts: what answers each model turn (tool output), and when a
trajectory ends. `grpo.environments.base` says what one is; one module per environment, each
imported here so that `ENVIRONMENTS` holds them all."""

from grpo.environments import (
    python_tool,  # noqa: F401  (registers python_tool)
    single_turn,  # noqa: F401  (registers single_turn)
)
