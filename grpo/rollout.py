"""Rollouts: render prompts, sample G completions per prompt, and score tokens' log-probs.

Generation uses `grpo.fast_generate` (a lean decoder for Llama/Qwen models, same greedy tokens)
or transformers' `generate` (KV cache, sampling, left padding). A completion ends at EOS, at an
optional stop pattern (e.g. the `#### N` answer line), or at `max_new_tokens`, in which case it
is marked truncated. Its mask covers exactly the tokens the policy sampled, the EOS included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from grpo import fast_generate
from grpo.prompts import chat_messages, format_prompt


@dataclass
class Rollout:
    """A generated batch: prompt and completion tokens, masks and decoded text."""

    prompt_ids: torch.Tensor  # (N, P), left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, T), right-padded
    completion_mask: torch.Tensor  # (N, T), 1 on sampled tokens
    truncated: torch.Tensor  # (N,), bool: hit max_new_tokens without EOS or stop pattern
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def rows(self, index: slice) -> Rollout:
        """The rollout restricted to rows `index` (a micro-batch)."""
        return Rollout(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.completion_ids[index],
            self.completion_mask[index],
            self.truncated[index],
            self.texts[index],
        )


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: list[str], use_chat_template: bool
) -> list[str]:
    """The seed's prompt template, inside the chat template for chat models."""
    if not use_chat_template:
        return [format_prompt(q) for q in questions]
    return [
        tokenizer.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True)
        for q in questions
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
    do_sample: bool = True,
    stop_pattern: str | None = None,
    min_new_tokens: int = 0,
    backend: str = "lean",
) -> Rollout:
    """Sample `num_return_sequences` completions per prompt, rows grouped by prompt.

    `backend`: "lean" decodes with `grpo.fast_generate.sample` where it supports the model
    (same greedy tokens as transformers, less overhead per token), else with transformers'
    `generate`; "transformers" always uses `generate`.
    """
    if backend not in ("lean", "transformers"):
        raise ValueError(f"trainer.generation_backend={backend!r}: expected lean | transformers")
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
    if backend == "lean" and fast_generate.supports(model):
        out, _ = fast_generate.sample(
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
        )
    else:
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
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
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts)


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


def token_logprobs(
    model: PreTrainedModel,
    rollout: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_logits: int | None = 2**24,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, T) of the completion tokens under `model`, at the sampling temperature.

    Columns that are padding in every row (left of the longest prompt, right of the longest
    completion) are cut before the forward pass. For Llama/Qwen2/Qwen3 models the LM head then
    runs only at sampled tokens, in chunks of at most `chunk_logits` logits (tokens x
    vocabulary; 0 = one chunk) recomputed in backward, so no (N, T, V) tensor is ever held.
    `chunk_logits=None`, and other models, compute all completion positions' logits at once
    (`logits_to_keep`). Padding positions get log-prob 0. Entropy (N, T), when asked, is
    computed without gradient, for logging, unless `entropy_grad` (an entropy bonus in the
    loss needs its gradient).
    """
    t = rollout.completion_ids.shape[1]
    start = int(rollout.prompt_mask.any(0).long().argmax())
    used = rollout.completion_mask.any(0).nonzero()
    t_used = int(used[-1]) + 1 if len(used) else 1
    trimmed = Rollout(
        rollout.prompt_ids[:, start:],
        rollout.prompt_mask[:, start:],
        rollout.completion_ids[:, :t_used],
        rollout.completion_mask[:, :t_used],
        rollout.truncated,
        rollout.texts,
    )
    lm = fast_generate.causal_lm(model)
    head = lm.get_output_embeddings()
    chunked = (
        lm.config.model_type in fast_generate.SUPPORTED_MODEL_TYPES and type(head) is nn.Linear
    )
    if chunked and chunk_logits is not None:
        logp, entropy = _logprobs_from_hidden(
            model, head, trimmed, temperature, with_entropy, entropy_grad, chunk_logits
        )
    else:
        logp, entropy = _logprobs_from_logits(
            model, trimmed, temperature, with_entropy, entropy_grad
        )
    pad = (0, t - t_used)
    return F.pad(logp, pad), None if entropy is None else F.pad(entropy, pad)


def _model_inputs(rollout: Rollout) -> dict[str, torch.Tensor]:
    """Prompt and completion as one left- and right-padded batch, with its position ids."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


def _logprobs_from_hidden(
    model: PreTrainedModel,
    head: nn.Linear,
    rollout: Rollout,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_logits: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` from the backbone's hidden states and the chunked LM head."""
    t = rollout.completion_ids.shape[1]
    # The model's own forward (hooks see it), for its final hidden states; one logit row each.
    out = model(
        **_model_inputs(rollout), output_hidden_states=True, logits_to_keep=1, use_cache=False
    )
    hidden = out.hidden_states[-1][:, -(t + 1) : -1]
    valid = rollout.completion_mask.bool()
    rows = max(1, chunk_logits // head.out_features) if chunk_logits else int(valid.sum())
    logp, entropy = _ChunkedLogProbs.apply(
        hidden[valid], head.weight, rollout.completion_ids[valid], temperature, with_entropy, rows
    )
    logp = hidden.new_zeros(valid.shape, dtype=torch.float32).masked_scatter(valid, logp)
    if not with_entropy:
        return logp, None
    if not (entropy_grad and torch.is_grad_enabled()):
        entropy = entropy.detach()
    return logp, hidden.new_zeros(valid.shape, dtype=torch.float32).masked_scatter(valid, entropy)


def _logprobs_from_logits(
    model: PreTrainedModel,
    rollout: Rollout,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` for any model: the logits of the completion positions at once."""
    t = rollout.completion_ids.shape[1]
    logits = model(**_model_inputs(rollout), logits_to_keep=t + 1, use_cache=False).logits
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    valid = rollout.completion_mask.bool()
    logp = torch.where(valid, chosen - logits.logsumexp(-1), 0.0)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            p = logits.softmax(-1)
            entropy = torch.where(valid, -(p * torch.log_softmax(logits, -1)).sum(-1), 0.0)
    return logp, entropy


class _ChunkedLogProbs(torch.autograd.Function):
    """Log-probs (and entropies) of chosen tokens from final hidden states, chunk by chunk.

    Forward keeps only the hidden states and each row's logsumexp; backward recomputes a
    chunk's logits z and applies d logp / d z = (onehot - p) / temperature and
    d H / d z = -p (log p + H) / temperature. Two (chunk, V) buffers at a time, updated in place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, with_entropy, rows):
        n = ids.shape[0]
        logp, lse = (hidden.new_empty(n, dtype=torch.float32) for _ in range(2))
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            logits = _head_logits(hidden[part], weight, temperature)
            lse[part] = logits.logsumexp(-1)
            logp[part] = logits.gather(1, ids[part, None])[:, 0] - lse[part]
            if with_entropy:  # H = lse - sum(p z)
                p = (logits - lse[part, None]).exp_()
                entropy[part] = lse[part] - p.mul_(logits).sum(-1)
        ctx.save_for_backward(hidden, weight, ids, lse, entropy)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, ids, lse, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        n = ids.shape[0]
        g_logp = grad_logp if grad_logp is not None else lse.new_zeros(n)
        for start in range(0, n, ctx.rows):
            part = slice(start, start + ctx.rows)
            log_p = _head_logits(hidden[part], weight, ctx.temperature).sub_(lse[part, None])
            p = log_p.exp()
            # grad z = p * c + onehot * g_logp, with c = -g_logp - g_H (log p + H)
            coef = -g_logp[part, None]
            if grad_entropy is not None:
                coef = log_p.add_(entropy[part, None]).mul_(-grad_entropy[part, None]).add_(coef)
            grad = p.mul_(coef).scatter_add_(1, ids[part, None], g_logp[part, None])
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[part])
            if ctx.needs_input_grad[1]:
                if grad_weight is None:
                    grad_weight = grad.T @ hidden[part]
                else:
                    grad_weight.addmm_(grad.T, hidden[part])
        return grad_hidden, grad_weight, None, None, None, None


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 logits of the LM head, divided by the temperature."""
    logits = F.linear(hidden, weight).float()
    return logits / temperature if temperature != 1.0 else logits
