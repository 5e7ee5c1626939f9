"""Rollouts: render prompts and sample G completions per prompt (log-probs: `logprobs.py`).

Three backends (`rollout.backend`): `lean`, the lean decoder of `grpo.rollout.lean` for
Llama/Qwen models (the same greedy tokens as transformers, less overhead per token; other models
fall back to `generate`); `transformers`, its `generate` (KV cache, sampling, left padding);
`vllm`, vLLM's engine in this process (`grpo.rollout.vllm_engine`). A completion ends at EOS, at
an optional stop pattern (e.g. the `#### N` answer line), or at `max_new_tokens`, in which case
it is marked truncated. Its mask covers exactly the tokens the policy sampled, the EOS included.
With `with_logprobs` (always with vLLM) the rollout keeps each sampled token's log-prob under the
generating backend, for the rollout-vs-training correction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from grpo.batch import Rollout
from grpo.rollout import lean, vllm_engine
from grpo.tasks.base import Row, Task

BACKENDS = ("lean", "transformers", "vllm")


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
    engine: Any = None,
    with_logprobs: bool = False,
) -> Rollout:
    """Sample `num_return_sequences` completions per prompt, rows grouped by prompt, with
    `backend` (see the module docstring; "vllm" needs the policy's `engine`)."""
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
    if backend == "vllm":
        if engine is None:
            raise ValueError("rollout.backend=vllm: the policy has no vLLM engine")
        sampled = engine.generate(
            tokenizer,
            enc.input_ids,
            enc.attention_mask,
            num_return_sequences,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            do_sample,
            stop_pattern,
            min_new_tokens,
        )
        return vllm_engine.to_rollout(
            tokenizer, enc.input_ids, enc.attention_mask, num_return_sequences, *sampled
        )
    prompt_ids = enc.input_ids.repeat_interleave(num_return_sequences, 0)
    prompt_mask = enc.attention_mask.repeat_interleave(num_return_sequences, 0)
    prompt_len = prompt_ids.shape[1]
    stop = StopOnPattern(tokenizer, stop_pattern, prompt_len) if stop_pattern else None
    logprobs = None
    if backend == "lean" and lean.supports(model):
        out, logprobs = lean.sample(
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
            with_logprobs=with_logprobs,
            num_return_sequences=num_return_sequences,
            top_k=top_k,
        )
    else:
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            stopping_criteria=[stop] if stop else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=with_logprobs,
            **sampling,
        )
        out = generated.sequences
        if with_logprobs:  # the processed scores: the distribution each token was drawn from
            scores = torch.stack(generated.scores, 1).float().log_softmax(-1)
            logprobs = scores.gather(-1, out[:, prompt_len:, None])[..., 0]
    completion_ids = out[:, prompt_len:]
    lengths, truncated = _completion_lengths(
        completion_ids, tokenizer.eos_token_id, stop.stopped_at if stop else {}
    )
    positions = torch.arange(completion_ids.shape[1], device=device)
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
