"""Rollouts: render prompts and sample G completions per prompt (log-probs: `logprobs.py`).

Generation uses `grpo.rollout.lean` (a lean decoder for Llama/Qwen models, same greedy tokens)
or transformers' `generate` (KV cache, sampling, left padding). A completion ends at EOS, at an
optional stop pattern (e.g. the `#### N` answer line), or at `max_new_tokens`, in which case it
is marked truncated. Its mask covers exactly the tokens the policy sampled, the EOS included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from grpo.batch import Rollout
from grpo.rollout import lean
from grpo.tasks.base import Row, Task

BACKENDS = ("lean", "transformers")


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, task: Task, rows: Sequence[Row], use_chat_template: bool
) -> list[str]:
    """The task's prompt for each row: inside the tokenizer's chat template for chat models,
    else the messages' text joined by blank lines."""
    messages = [task.messages(row) for row in rows]
    if not use_chat_template:
        return ["\n\n".join(m["content"] for m in chat) for chat in messages]
    return [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        for chat in messages
    ]


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


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_return_sequences: int = 1,
    max_new_tokens: int = 64,
    max_prompt_length: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    stop_pattern: str | None = None,
    min_new_tokens: int = 0,
    backend: str = "lean",
) -> Rollout:
    """Sample `num_return_sequences` completions per prompt, rows grouped by prompt.

    `backend`: "lean" decodes with `grpo.lean.sample` where it supports the model
    (same greedy tokens as transformers, less overhead per token), else with transformers'
    `generate`; "transformers" always uses `generate`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rollout.backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    device = next(model.parameters()).device
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
        truncation=True,
        max_length=max_prompt_length,
    ).to(device)
    prompt_ids = enc.input_ids.repeat_interleave(num_return_sequences, 0)
    prompt_mask = enc.attention_mask.repeat_interleave(num_return_sequences, 0)
    prompt_len = prompt_ids.shape[1]
    stop = StopOnPattern(tokenizer, stop_pattern, prompt_len) if stop_pattern else None
    if backend == "lean" and lean.supports(model):
        out, _ = lean.sample(
            model,
            enc.input_ids,
            enc.attention_mask,
            max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            min_new_tokens,
            temperature,
            top_p,
            do_sample,
            stop,
            num_return_sequences=num_return_sequences,
            top_k=top_k,
        )
    else:
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            stopping_criteria=[stop] if stop else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )
    completion_ids = out[:, prompt_len:]
    lengths, truncated = _completion_lengths(
        completion_ids, tokenizer.eos_token_id, stop.stopped_at if stop else {}
    )
    positions = torch.arange(completion_ids.shape[1], device=device)
    completion_mask = (positions[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        truncated,
        texts,
        tokenizer.pad_token_id,
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
