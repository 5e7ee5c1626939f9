"""How completions are sampled: one frozen object that every backend and the evaluation take.

`SamplingSettings.from_config(cfg.rollout, stop_pattern, keep_logprobs, max_turns)` is built once
from `rollout.*`, the task's stop rule and the environment's turn limit; `greedy(max_new_tokens)`
is the held-out evaluation's variant and `sampled(temperature, top_p, max_new_tokens)` that of
its pass@k samples and of the model comparison.

Seeds: a backend draws its randomness from torch's global generator (the lean decoder and
transformers sample with it; vLLM takes one seed per prompt from it), which the trainer seeds
with `seed + rank`; so a run, and each rank of it, reproduces. The asynchronous producer
(`grpo.rollout.producer`) gives vLLM a generator of its own per batch (`seed_generator`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling of one generate call (see the module docstring)."""

    max_new_tokens: int  # completion budget; a completion cut there is marked truncated
    max_prompt_length: int  # longer prompts keep their last tokens
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling (1 = off)
    top_k: int = 0  # the k most likely tokens (0 = off)
    min_new_tokens: int = 0  # EOS is banned before this many tokens
    do_sample: bool = True  # False: greedy decoding (temperature, top-p, top-k unused)
    stop_pattern: str | None = None  # a regex: the completion ends once its text matches
    keep_logprobs: bool = False  # keep each sampled token's log-prob under the backend
    # Where vLLM's per-prompt seeds come from (None: torch's global generator); the
    # asynchronous producer's own, so its draws never interleave with the trainer thread's.
    seed_generator: torch.Generator | None = None
    # A multi-turn trajectory's completion budget over all its turns, environment tokens included
    # (grpo.rollout.multiturn); None: one turn's, max_new_tokens.
    max_total_tokens: int | None = None

    @classmethod
    def from_config(
        cls, rollout: Any, stop_pattern: str | None, keep_logprobs: bool, max_turns: int = 1
    ) -> SamplingSettings:
        """The training rollout's settings from the `rollout` config node; with `max_turns` > 1
        (a multi-turn environment) `rollout.max_total_tokens`, null meaning max_turns turns of
        `max_new_tokens`."""
        total = rollout.max_total_tokens or max_turns * rollout.max_new_tokens
        return cls(
            max_new_tokens=rollout.max_new_tokens,
            max_prompt_length=rollout.max_prompt_length,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            min_new_tokens=rollout.min_new_tokens,
            stop_pattern=stop_pattern,
            keep_logprobs=keep_logprobs,
            max_total_tokens=total if max_turns > 1 else None,
        )

    @property
    def trajectory_tokens(self) -> int:
        """The completion budget of one trajectory: all its turns, environment tokens included."""
        return self.max_total_tokens or self.max_new_tokens

    @property
    def context_length(self) -> int:
        """The most tokens a backend holds for one row: the longest prompt and trajectory (a
        continuation's prompt is the first prompt and the trajectory so far, never cut)."""
        return self.max_prompt_length + self.trajectory_tokens

    def greedy(self, max_new_tokens: int | None = None) -> SamplingSettings:
        """Greedy decoding with the same prompt length and stop rule (held-out evaluation);
        `max_new_tokens` None keeps the budget."""
        return self.sampled(1.0, 1.0, max_new_tokens, do_sample=False)

    def sampled(
        self,
        temperature: float,
        top_p: float,
        max_new_tokens: int | None = None,
        do_sample: bool = True,
    ) -> SamplingSettings:
        """Plain sampling at `temperature` / `top_p` (no top-k, no minimum length, no log-probs)
        with the same prompt length and stop rule; `max_new_tokens` None keeps the budget."""
        return dataclasses.replace(
            self,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            min_new_tokens=0,
            do_sample=do_sample,
            keep_logprobs=False,
        )
