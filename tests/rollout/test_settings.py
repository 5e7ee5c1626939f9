"""Sampling settings: built once from `rollout.*`, frozen, with the evaluation's variants."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import compose_config

from grpo.rollout.settings import SamplingSettings


def test_from_the_config_with_the_tasks_stop_rule():
    cfg = compose_config("rollout.top_k=5", "rollout.min_new_tokens=3")
    settings = SamplingSettings.from_config(cfg.rollout, r"#### \d+", keep_logprobs=True)
    ro = cfg.rollout
    assert (settings.max_new_tokens, settings.max_prompt_length) == (
        ro.max_new_tokens,
        ro.max_prompt_length,
    )
    assert (settings.temperature, settings.top_p, settings.top_k) == (ro.temperature, 1.0, 5)
    assert settings.min_new_tokens == 3 and settings.do_sample and settings.keep_logprobs
    assert settings.stop_pattern == r"#### \d+"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 1.0


def test_greedy_and_sampled_variants_keep_the_prompt_and_stop_rule_only():
    base = SamplingSettings(64, 256, 0.7, 0.9, 5, 3, True, "####", True)
    greedy = base.greedy()
    assert not greedy.do_sample and greedy.max_new_tokens == 64
    assert (greedy.top_k, greedy.min_new_tokens, greedy.keep_logprobs) == (0, 0, False)
    assert (greedy.max_prompt_length, greedy.stop_pattern) == (256, "####")
    sampled = base.sampled(1.0, 0.95, max_new_tokens=16)
    assert sampled.do_sample and (sampled.temperature, sampled.top_p) == (1.0, 0.95)
    assert (sampled.max_new_tokens, sampled.top_k, sampled.min_new_tokens) == (16, 0, 0)
    assert base.greedy(8).max_new_tokens == 8
