"""Generation and log-prob paths: the lean decoder against transformers' `generate`, the
chunked log-probs against a plain forward pass, and switches that must not change a run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, TINY, read_metrics, run_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from grpo import fast_generate
from grpo.loss import GRPOLoss
from grpo.rollout import Rollout, generate, render_prompts, token_logprobs
from grpo.update import make_reference, policy_update

EOS, PAD, VOCAB = 2, 3, 300
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def random_model(kind: str, kv_heads: int, eos: int = EOS):
    """A random 2-layer model of architecture `kind` (GQA when kv_heads < 4 heads)."""
    config_cls, model_cls = ARCHITECTURES[kind]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        eos_token_id=eos,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def prompt_batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Six left-padded prompts (rows 0 and 2 padded when `padded`)."""
    torch.manual_seed(1)
    ids = torch.randint(4, VOCAB, (6, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
    return ids.masked_fill(mask == 0, PAD), mask


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
def test_lean_sampling_logprobs_equal_a_forward_pass(temperature):
    model = random_model("qwen2", 2)
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


def tiny_policy(lora: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", f"model.lora.enabled={lora}"])
    torch.manual_seed(0)
    return instantiate(cfg.model)


QUESTIONS = ["Ava has 3 apples and gets 4 more. How many?", "Ben buys 2 bags of 5 pens each."]


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


def varied_rollout(policy) -> Rollout:
    """Prompts of different lengths, completions of lengths 1..12 (right-padded)."""
    questions = [*QUESTIONS, "Cleo had 12 cards and gave away 5. How many are left?", "Hi"]
    prompts = render_prompts(policy.tokenizer, questions, False)
    torch.manual_seed(2)
    full = generate(policy.model, policy.tokenizer, prompts, 2, max_new_tokens=12)
    lengths = torch.tensor([12, 3, 7, 1, 12, 5, 9, 2])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = full.completion_ids.masked_fill(mask == 0, policy.tokenizer.pad_token_id)
    return Rollout(full.prompt_ids, full.prompt_mask, ids, mask, lengths == 12, full.texts)


def plain_logprobs(model, rollout: Rollout, temperature: float):
    """Log-probs and entropies from the full logits of an ordinary forward pass."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    t = rollout.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(0))
    logp_all = torch.log_softmax(logits.logits[:, -(t + 1) : -1].float() / temperature, -1)
    valid = rollout.completion_mask.bool()
    logp = logp_all.gather(-1, rollout.completion_ids[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def value_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    logp, entropy = fn()
    (logp.sum() + 0.5 * entropy.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return logp.detach(), entropy.detach(), grads


def random_rollout() -> Rollout:
    """Left-padded prompts and right-padded completions of lengths 1..5 (no model needed)."""
    ids, mask = prompt_batch(padded=True)
    torch.manual_seed(4)
    completion = torch.randint(4, VOCAB, (6, 5))
    lengths = torch.tensor([5, 2, 4, 1, 5, 3])
    completion_mask = (torch.arange(5)[None] < lengths[:, None]).long()
    completion = completion.masked_fill(completion_mask == 0, PAD)
    return Rollout(ids, mask, completion, completion_mask, lengths == 5, [""] * 6)


@pytest.mark.parametrize("chunk_logits", [2**24, 1000, 0, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_the_full_logits(chunk_logits, temperature):
    policy = tiny_policy()
    model = policy.model.train()
    rollout = varied_rollout(policy)
    for rows in (slice(0, 8), slice(3, 4), slice(1, 3)):
        micro = rollout.rows(rows)
        got = value_and_grads(
            model,
            lambda m=micro: token_logprobs(
                model, m, temperature, True, entropy_grad=True, chunk_logits=chunk_logits
            ),
        )
        want = value_and_grads(model, lambda m=micro: plain_logprobs(model, m, temperature))
        assert_all_close(got, want)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_chunked_logprobs_for_each_architecture(kind):
    model = random_model(kind, kv_heads=2)
    rollout = random_rollout()
    got = value_and_grads(model, lambda: token_logprobs(model, rollout, 0.7, True, True, 900))
    want = value_and_grads(model, lambda: plain_logprobs(model, rollout, 0.7))
    assert_all_close(got, want)


def assert_all_close(got, want) -> None:
    """Log-probs, entropies and every parameter gradient agree to float tolerance."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_entropy_has_no_gradient_unless_asked():
    policy = tiny_policy()
    rollout = varied_rollout(policy)
    logp, entropy = token_logprobs(policy.model, rollout, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad


def test_other_architectures_use_the_logits_path():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    rollout = random_rollout()
    got = value_and_grads(model, lambda: token_logprobs(model, rollout, 1.0, True, True))
    want = value_and_grads(model, lambda: plain_logprobs(model, rollout, 1.0))
    assert_all_close(got, want)


def snapshot(policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.model.parameters()]


def test_no_reference_forward_at_kl_zero_gives_the_same_update():
    """Skipping the reference (kl_coef = 0) changes nothing but the KL statistics."""
    policy = tiny_policy()
    rollout = varied_rollout(policy)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0, -0.5, 0.5])
    results = []
    for with_reference in (True, False):
        policy = tiny_policy()
        reference = make_reference(policy, 1.0) if with_reference else None
        optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
        stats = policy_update(
            policy, rollout, advantages, GRPOLoss(kl_coef=0.0), optimizer, reference, 4, 1.0, 1.0
        )
        results.append((stats, snapshot(policy)))
    (with_ref, params_ref), (without, params) = results
    assert "kl_mean" in with_ref and "kl_mean" not in without
    for key in ("total_loss", "policy_loss", "grad_norm", "entropy_mean"):
        assert with_ref[key] == pytest.approx(without[key], rel=1e-6, abs=1e-9), key
    for a, b in zip(params_ref, params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_micro_batching_leaves_a_short_run_unchanged(tmp_path):
    """A 2-step tiny CLI run: the same metrics with micro-batches of 4 and of 1."""
    runs = []
    for micro_batch_size in (4, 1):
        run_dir = tmp_path / f"mb{micro_batch_size}"
        run_train(*TINY, f"trainer.micro_batch_size={micro_batch_size}", f"hydra.run.dir={run_dir}")
        runs.append([m for m in read_metrics(run_dir) if "train/total_loss" in m])
    for whole, micro in zip(*runs, strict=True):
        for key in ("train/total_loss", "train/kl_mean", "train/grad_norm", "rewards/mean"):
            assert micro[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7), key


def test_transformers_backend_trains_from_the_cli(tiny_run):
    run_dir, _ = tiny_run("trainer.generation_backend=transformers")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
