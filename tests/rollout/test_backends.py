"""Generation backends: every registered one builds from the registry with one signature; the
in-process ones give the same greedy rollout; top-k; rendering prompts. The lean decoder
against transformers' `generate` is in test_lean.py, vLLM in test_vllm_engine.py."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import generate, tiny_policy, tiny_task

from grpo.rollout.backends import BACKENDS
from grpo.rollout.base import Backend
from grpo.rollout.source import render_prompts


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_is_a_backend_with_the_one_signature(name):
    backend = BACKENDS[name]
    assert issubclass(backend, Backend)
    params = list(inspect.signature(backend.generate).parameters)
    assert params == ["self", "prompt_ids", "prompt_mask", "n", "settings"]
    assert list(inspect.signature(backend).parameters)[:2] == ["policy", "settings"]


@pytest.mark.parametrize("lora", [False, True])
def test_in_process_backends_give_the_same_greedy_rollout(lora):
    policy = tiny_policy(lora)
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    greedy = {"max_new_tokens": 20, "do_sample": False, "stop_pattern": r"\d"}
    lean, reference = (
        generate(policy, prompts, 2, name, **greedy) for name in ("lean", "transformers")
    )
    for field in ("prompt_ids", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(lean, field), getattr(reference, field)), field
    assert lean.texts == reference.texts


@pytest.mark.parametrize("backend", ["lean", "transformers"])
def test_top_k_of_one_samples_the_greedy_tokens(backend):
    policy = tiny_policy()
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)

    def run(**sampling):
        torch.manual_seed(0)
        return generate(policy, prompts, 2, backend, max_new_tokens=12, **sampling)

    greedy, top1 = run(do_sample=False), run(temperature=1.3, top_k=1)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    assert not torch.equal(run(temperature=1.3).completion_ids, greedy.completion_ids)


def test_prompts_render_from_the_task_as_text_or_chat():
    policy = tiny_policy()
    task = tiny_task(system_prompt="Be brief.")
    row = task.train[0]
    text = render_prompts(policy.tokenizer, task, [row], use_chat_template=False)[0]
    assert text == "Be brief.\n\n" + task.prompt(row)
    assert row["question"] in text and "####" in text
