"""bfloat16 end to end on the CPU, for the tiny Llama, Qwen2 and Qwen3 models: generation (the
lean decoder equals `generate`), log-probs, an update, a run with checkpoints and resume; and the
float32 LM head (`model.lm_head_fp32`)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ARCHITECTURES,
    EOS,
    PAD,
    lean_sample,
    make_actor,
    prompt_batch,
    random_model,
    step_lines,
)

from grpo.actor.logprobs import token_logprobs
from grpo.batch import Rollout
from grpo.model.loading import Float32Head, Policy
from grpo.run.records import compare_metrics

BF16 = torch.bfloat16


def bf16_rollout(model, new_tokens: int = 10) -> Rollout:
    ids, mask = prompt_batch(padded=True)
    torch.manual_seed(3)
    tokens, _ = lean_sample(model, ids, mask, new_tokens, temperature=1.0)
    completion = tokens[:, ids.shape[1] :]
    width = completion.shape[1]
    sampled = (torch.arange(width)[None] < width).long().expand_as(completion).clone()
    return Rollout(ids, mask, completion, sampled, torch.ones(6, dtype=torch.bool), [""] * 6, PAD)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_bf16_lean_greedy_tokens_equal_generate(kind):
    model = random_model(kind, kv_heads=2, dtype=BF16)
    ids, mask = prompt_batch(padded=True)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
        pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    tokens, _ = lean_sample(model, ids, mask, 12, do_sample=False)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_bf16_logprobs_and_an_update(kind):
    model = random_model(kind, kv_heads=2, dtype=BF16).train()
    rollout = bf16_rollout(model)
    logp, entropy = token_logprobs(model, rollout, 1.0, with_entropy=True)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all() and (logp <= 0).all()
    with torch.no_grad():  # the same weights computed in float32: bf16's error stays small
        exact, _ = token_logprobs(random_model(kind, kv_heads=2).eval(), rollout, 1.0)
    assert (logp - exact).abs().mean() < 0.1
    policy = Policy(model, None, False, False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    actor = make_actor(policy, optimizer=optimizer, micro_batch_size=3, inference_batch_size=6)
    scores = actor.score(rollout)
    before = [p.detach().clone() for p in model.parameters()]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    stats = actor.update(rollout, advantages, scores)
    assert torch.isfinite(torch.tensor(stats["total_loss"])) and stats["grad_norm"] > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.dtype == BF16 for p in model.parameters())


def test_the_float32_head_computes_its_logits_in_float32():
    model = random_model("qwen3", kv_heads=2, dtype=BF16)
    head = model.get_output_embeddings()
    head.__class__ = Float32Head
    x = torch.randn(3, head.in_features, dtype=BF16)
    assert torch.equal(head(x), F.linear(x.float(), head.weight.float()))
    assert head.weight.dtype == BF16  # the weights stay as they are
    rollout = bf16_rollout(model)
    chunked, _ = token_logprobs(model, rollout, 1.0)
    plain, _ = token_logprobs(model, rollout, 1.0, chunk_logits=None)  # logits from forward
    torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=0)


@pytest.mark.parametrize("fp32_head", [False, True])
def test_a_bf16_run_trains_checkpoints_and_resumes_exactly(tiny_train, fp32_head):
    settings = ("model.dtype=bfloat16", f"model.lm_head_fp32={fp32_head}", "reward=hybrid")
    run = (*settings, "trainer.max_steps=3", "trainer.save_every=1", "eval.comparison.at_end=false")
    whole, _ = tiny_train(*run, name="whole")
    lines = step_lines(whole)
    assert len(lines) == 3 and all(math.isfinite(m["train/total_loss"]) for m in lines)
    assert lines[-1]["train/grad_norm"] > 0  # the hybrid reward gives a random model a signal
    again = whole.parent / "again"
    shutil.copytree(whole, again)
    shutil.rmtree(again / "checkpoints" / "step_000002")  # resume from step 1
    tiny_train(*run, "trainer.resume=auto", name="again")
    assert compare_metrics(whole, again) == []
