"""The rollout source: rows -> rendered prompts -> the backend's completions -> rewards, timed;
the same rows and settings give what the backend and the reward give called by hand."""

from __future__ import annotations

import torch
from conftest import generate, tiny_policy, tiny_task

from grpo.rollout.lean import LeanBackend
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource, render_prompts
from grpo.tasks.rewards import HybridReward


def test_the_source_is_render_generate_score_in_one_call():
    policy, task, reward = tiny_policy(), tiny_task(), HybridReward()
    settings = SamplingSettings(max_new_tokens=10, max_prompt_length=256)
    source = RolloutSource(task, policy, LeanBackend(policy, settings), reward)
    rows = task.train[:3]
    torch.manual_seed(4)
    scored = source(rows, 2, settings)
    assert scored.rows == [row for row in rows for _ in range(2)]  # grouped by prompt
    assert scored.generate_s > 0 and scored.reward_s > 0
    prompts = render_prompts(policy.tokenizer, task, rows, policy.use_chat_template)
    torch.manual_seed(4)
    by_hand = generate(policy, prompts, 2, max_new_tokens=10)
    assert torch.equal(scored.rollout.completion_ids, by_hand.completion_ids)
    assert scored.rollout.texts == by_hand.texts
    lengths = by_hand.lengths.tolist()
    answers = [task.answer(row) for row in scored.rows]
    expected = reward(by_hand.texts, answers, [p for p in prompts for _ in range(2)], lengths, 10)
    assert scored.scores == expected
