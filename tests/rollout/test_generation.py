"""Generation: the backends give the same greedy rollout, rendering prompts, top-k; the
lean decoder against transformers' `generate` is in test_lean.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_policy, tiny_task

from grpo.rollout.generation import generate, render_prompts


@pytest.mark.parametrize("lora", [False, True])
def test_generate_backends_give_the_same_greedy_rollout(lora):
    policy = tiny_policy(lora)
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    rollouts = [
        generate(
            policy.model,
            policy.tokenizer,
            prompts,
            2,
            max_new_tokens=20,
            do_sample=False,
            stop_pattern=r"\d",
            backend=backend,
        )
        for backend in ("lean", "transformers")
    ]
    lean, reference = rollouts
    for field in ("prompt_ids", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(lean, field), getattr(reference, field)), field
    assert lean.texts == reference.texts


def test_unknown_backend_names_the_key():
    policy = tiny_policy()
    with pytest.raises(ValueError, match="rollout.backend"):
        generate(policy.model, policy.tokenizer, ["x"], backend="tgi")


@pytest.mark.parametrize("backend", ["lean", "transformers"])
def test_top_k_of_one_samples_the_greedy_tokens(backend):
    policy = tiny_policy()
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)

    def run(**sampling):
        torch.manual_seed(0)
        return generate(policy.model, policy.tokenizer, prompts, 2, 12, backend=backend, **sampling)

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
