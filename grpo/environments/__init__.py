"""Environments for multi-turn rollouts: what answers each model turn (tool output), and when a
trajectory ends. `grpo.environments.base` says what one is; one module per environment."""
