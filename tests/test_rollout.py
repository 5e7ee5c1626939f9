"""Generation: the lean decoder against transformers' `generate` (greedy tokens, sampled
log-probs), its sampler, and the fallbacks."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    EOS,
    PAD,
    QUESTIONS,
    VOCAB,
    prompt_batch,
    random_model,
    tiny_policy,
)
from transformers import GPT2Config, GPT2LMHeadModel

from grpo import fast_generate
from grpo.logprobs import token_logprobs
from grpo.rollout import Rollout, generate, render_prompts


def hf_greedy(model, ids, mask, eos: int, new_tokens: int = 16, min_new_tokens: int = 2):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=eos,
    )


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize(("padded", "copies"), [(True, 1), (False, 1), (True, 3)])
def test_lean_greedy_tokens_equal_generate(kind, kv_heads, padded, copies):
    ids, mask = prompt_batch(padded)
    free_run = hf_greedy(random_model(kind, kv_heads), ids, mask, EOS)
    # An end token the rows actually produce, so rows finish at different steps.
    eos = int(free_run[0, ids.shape[1] + 5])
    model = random_model(kind, kv_heads, eos)
    assert fast_generate.supports(model)
    rows, row_mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
    expected = hf_greedy(model, rows, row_mask, eos)
    tokens, _ = fast_generate.sample(
        model, ids, mask, 16, eos, PAD, 2, do_sample=False, num_return_sequences=copies
    )
    assert torch.equal(tokens, expected)
    assert (tokens[:, ids.shape[1] :] == PAD).any(), "some rows should have finished early"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("pack", [False, True])
def test_lean_sampling_logprobs_equal_a_forward_pass(temperature, pack, monkeypatch):
    """Also with MKL-packed weights (used when sampling from models too big for the caches)."""
    if pack:
        monkeypatch.setattr(fast_generate, "PACK_BYTES", 0)  # pack even this small model
    model = random_model("qwen2", 2)
    if fast_generate._packing_pays(model) != pack:
        pytest.skip("this torch build has no MKL packed linear")
    ids, mask = prompt_batch(padded=True)
    torch.manual_seed(3)
    tokens, logprobs = fast_generate.sample(
        model, ids, mask, 12, EOS, PAD, temperature=temperature, with_logprobs=True
    )
    completion = tokens[:, ids.shape[1] :]
    is_eos = (completion == EOS).long()
    sampled = ((is_eos.cumsum(1) - is_eos) == 0).long()  # up to and including the first EOS
    rollout = Rollout(ids, mask, completion, sampled, torch.zeros(6, dtype=torch.bool), [""] * 6)
    with torch.no_grad():
        expected, _ = token_logprobs(model, rollout, temperature)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_inverse_cdf_sampler_draws_from_probs():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(20_000, 1)
    torch.manual_seed(0)
    counts = torch.bincount(fast_generate.sample_token(probs), minlength=5).double() / 20_000
    assert counts[0] == counts[2] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(counts, probs[0].double(), atol=0.015, rtol=0)


def test_generation_config_extras_fall_back_to_generate():
    model = random_model("llama", 4)
    model.generation_config.repetition_penalty = 1.3
    assert not fast_generate.supports(model)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert not fast_generate.supports(gpt2)


@pytest.mark.parametrize("lora", [False, True])
def test_generate_backends_give_the_same_greedy_rollout(lora):
    policy = tiny_policy(lora)
    prompts = render_prompts(policy.tokenizer, QUESTIONS, False)
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
    with pytest.raises(ValueError, match="trainer.generation_backend"):
        generate(policy.model, policy.tokenizer, ["x"], backend="vllm")
