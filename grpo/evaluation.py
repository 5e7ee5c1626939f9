"""Held-out evaluation: greedy completions, scored by the reward and by exact-match accuracy.

Three accuracies, from strictest to most lenient:
- `accuracy_strict`: the number after `####` equals the reference answer;
- `accuracy_lenient`: the extracted answer (with fallbacks: "the answer is", boxed, last number)
  equals it;
- `accuracy_anywhere`: the reference number appears anywhere in the completion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from grpo.answer import answers_match, extract_answer, parse_number
from grpo.modeling import Policy
from grpo.rollout import generate, render_prompts

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_anywhere(text: str, truth: float | None) -> bool:
    """True when any number written in `text` equals `truth`."""
    return any(answers_match(parse_number(m), truth) for m in NUMBER.findall(text))


def score_completions(
    texts: list[str], answers: list[str], reward_fn: Callable, lengths: list[int]
) -> list[dict[str, Any]]:
    """Per completion: its reward, reward parts, and the three correctness checks."""
    out = reward_fn(texts, answers, lengths)
    records = []
    for i, (text, answer) in enumerate(zip(texts, answers, strict=True)):
        truth = extract_answer(answer, strict=True)
        records.append(
            {
                "completion": text,
                "reward": out.total[i],
                "parts": {k: v[i] for k, v in out.parts.items()},
                "strict": answers_match(extract_answer(text, strict=True), truth),
                "lenient": answers_match(extract_answer(text), truth),
                "anywhere": answer_anywhere(text, truth),
                "length": lengths[i],
            }
        )
    return records


@torch.no_grad()
def evaluate(
    policy: Policy,
    rows: list[dict[str, str]],
    reward_fn: Callable,
    max_new_tokens: int,
    batch_size: int = 32,
    max_prompt_length: int = 256,
    stop_pattern: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy-decode every row; return `eval/*` metrics and per-problem records."""
    policy.model.eval()
    records: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = render_prompts(
            policy.tokenizer, [r["question"] for r in chunk], policy.use_chat_template
        )
        rollout = generate(
            policy.model,
            policy.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length,
            do_sample=False,
            stop_pattern=stop_pattern,
        )
        answers = [r["answer"] for r in chunk]
        scored = score_completions(rollout.texts, answers, reward_fn, rollout.lengths.tolist())
        for row, record in zip(chunk, scored, strict=True):
            records.append({"question": row["question"], "answer": row["answer"], **record})
    n = max(len(records), 1)
    metrics = {
        "eval/avg_reward": sum(r["reward"] for r in records) / n,
        "eval/accuracy_strict": sum(r["strict"] for r in records) / n,
        "eval/accuracy_lenient": sum(r["lenient"] for r in records) / n,
        "eval/accuracy_anywhere": sum(r["anywhere"] for r in records) / n,
        "eval/avg_response_length": sum(r["length"] for r in records) / n,
    }
    return metrics, records
