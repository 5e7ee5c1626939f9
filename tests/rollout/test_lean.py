"""The lean decoder (grpo.rollout.lean) against transformers' `generate`: the same greedy
tokens for every architecture, sampled log-probs equal to a forward pass, its sampler, and the
models it leaves to `generate`."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    EOS,
    PAD,
    VOCAB,
    built_kernel,
    lean_sample,
    prompt_batch,
    random_model,
    tiny_policy,
)
from transformers import GPT2Config, GPT2LMHeadModel

from grpo.actor.logprobs import token_logprobs
from grpo.batch import Rollout
from grpo.rollout import lean, products


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
    assert lean.supports(model)
    rows, row_mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
    expected = hf_greedy(model, rows, row_mask, eos)
    tokens, _ = lean_sample(model, ids, mask, 16, eos, copies, min_new_tokens=2, do_sample=False)
    assert torch.equal(tokens, expected)
    assert (tokens[:, ids.shape[1] :] == PAD).any(), "some rows should have finished early"


def sampled_rollout(ids, mask, tokens, copies: int = 1) -> Rollout:
    """A rollout of `lean_sample`'s rows: each completion up to and including its first EOS."""
    completion = tokens[:, ids.shape[1] :]
    is_eos = (completion == EOS).long()
    sampled = ((is_eos.cumsum(1) - is_eos) == 0).long()  # up to and including the first EOS
    rows = completion.shape[0]
    ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
    return Rollout(
        ids, mask, completion, sampled, torch.zeros(rows, dtype=torch.bool), [""] * rows, PAD
    )


def use_fused_ops(fused: bool, monkeypatch) -> None:
    """The decoder with `decode_ops.cpp` (skip where it does not build) or with ATen's ops."""
    if not fused:
        monkeypatch.setattr(lean, "fused_ops", lambda lm, do_sample: None)
    else:
        built_kernel("decode_ops")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("product", [None, "FewRowsLinear", "PackedLinear"])
@pytest.mark.parametrize("fused", [True, False])
def test_lean_sampling_logprobs_equal_a_forward_pass(temperature, product, fused, monkeypatch):
    """Through each streaming product (models too big for the caches: our few-row kernel,
    oneDNN's packed linear) and without: then this small model's q/k/v and gate/up products are
    fused, biases included (Qwen2); with the operations between products fused
    (`decode_ops.cpp`) and with ATen's."""
    use_fused_ops(fused, monkeypatch)
    if product is not None:
        monkeypatch.setattr(products, "STREAM_BYTES", 0)  # stream even this small model
        if product == "FewRowsLinear":
            built_kernel("few_rows")
        if product == "PackedLinear" and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            pytest.skip("this torch build has no oneDNN packed linear")
        chosen = getattr(products, product)
        monkeypatch.setattr(products, "streaming_product", lambda rows: chosen)
    model = random_model("qwen2", 2)
    assert products.modes(model, do_sample=True)[0] == (product is not None)
    assert (lean.fused_ops(model, do_sample=True) is not None) == fused
    ids, mask = prompt_batch(padded=True)
    torch.manual_seed(3)
    tokens, logprobs = lean_sample(
        model, ids, mask, 12, temperature=temperature, keep_logprobs=True
    )
    with torch.no_grad():
        expected, _ = token_logprobs(model, sampled_rollout(ids, mask, tokens), temperature)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("padded", [True, False])
def test_fused_ops_sample_every_architecture(kind, kv_heads, padded):
    """`decode_ops.cpp` for each architecture (Qwen3's per-head q/k norms between the products
    and the kernel), with and without GQA and padding, each prompt's cache copied to 3 rows."""
    built_kernel("decode_ops")
    model = random_model(kind, kv_heads)
    assert lean.fused_ops(model, do_sample=True) is not None
    assert lean.fused_ops(model, do_sample=False) is None  # greedy stays bit-exact
    ids, mask = prompt_batch(padded)
    torch.manual_seed(5)
    tokens, logprobs = lean_sample(model, ids, mask, 10, n=3, keep_logprobs=True)
    with torch.no_grad():
        expected, _ = token_logprobs(model, sampled_rollout(ids, mask, tokens, copies=3))
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_fused_ops_leave_other_activations_to_aten():
    model = random_model("llama", 4)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert lean.fused_ops(model, do_sample=True) is None


def test_inverse_cdf_sampler_draws_from_probs():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(20_000, 1)
    torch.manual_seed(0)
    counts = torch.bincount(lean.sample_token(probs), minlength=5).double() / 20_000
    assert counts[0] == counts[2] == 0  # zero-probability tokens are never drawn
    torch.testing.assert_close(counts, probs[0].double(), atol=0.015, rtol=0)


def test_generation_config_extras_fall_back_to_generate():
    model = random_model("llama", 4)
    model.generation_config.repetition_penalty = 1.3
    assert not lean.supports(model)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert not lean.supports(gpt2)


def test_lora_adapters_are_merged_for_the_call_and_sample_the_policy():
    """Trained adapters (B != 0) merged into their weights: the sampled tokens' log-probs equal
    a training forward pass through peft's unmerged layers; the policy itself is untouched."""
    policy = tiny_policy(lora=True)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    before = {n: p.clone() for n, p in policy.model.named_parameters()}
    policy.model.eval()
    ids, mask = prompt_batch(padded=True)
    ids = ids.remainder(policy.tokenizer.vocab_size)
    torch.manual_seed(4)
    eos = policy.tokenizer.eos_token_id
    tokens, logprobs = lean_sample(policy.model, ids, mask, 10, eos, keep_logprobs=True)
    completion = tokens[:, ids.shape[1] :]
    is_eos = (completion == policy.tokenizer.eos_token_id).long()
    sampled = ((is_eos.cumsum(1) - is_eos) == 0).long()
    rollout = Rollout(
        ids, mask, completion, sampled, torch.zeros(6, dtype=torch.bool), [""] * 6, PAD
    )
    with torch.no_grad():
        expected, _ = token_logprobs(policy.model, rollout)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in policy.model.named_parameters())
    assert not policy.model.base_model.model.model.layers[0].self_attn.q_proj.merged
