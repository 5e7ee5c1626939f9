"""Log-probs of completions: the chunked LM head and the shared prompt pass against a plain
forward pass with full logits (values, entropies and every parameter gradient).

Two float32 computations of the same sums in another order differ in their last bits, and by
how much depends on the CPU's kernels (AVX2 and AVX-512 round differently). So each result is
compared with the same computation in float64, and must be as accurate as the plain float32
pass is there, on the machine that runs the test (`assert_as_accurate`).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    PAD,
    QUESTIONS,
    VOCAB,
    generate,
    prompt_batch,
    random_model,
    tiny_policy,
    trajectories,
)
from transformers import GPT2Config, GPT2LMHeadModel

from grpo.actor import logprobs
from grpo.actor.logprobs import (
    SharedPrompts,
    batch_logprobs,
    can_pack,
    micro_batches,
    rows_of,
    token_logprobs,
)
from grpo.batch import Rollout, take


def varied_rollout(policy) -> Rollout:
    """Prompts of different lengths, completions of lengths 1..12 (right-padded)."""
    questions = [*QUESTIONS, "Cleo had 12 cards and gave away 5. How many are left?", "Hi"]
    torch.manual_seed(2)
    full = generate(policy, questions, 2, max_new_tokens=12)
    lengths = torch.tensor([12, 3, 7, 1, 12, 5, 9, 2])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = full.completion_ids.masked_fill(mask == 0, policy.tokenizer.pad_token_id)
    return Rollout(
        full.prompt_ids, full.prompt_mask, ids, mask, lengths == 12, full.texts, full.pad_token_id
    )


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


def random_rollout(length: int = 5) -> Rollout:
    """Left-padded prompts and right-padded completions of lengths up to `length`."""
    ids, mask = prompt_batch(padded=True)
    torch.manual_seed(4)
    completion = torch.randint(4, VOCAB, (6, length))
    lengths = torch.tensor([length, 2, length - 1, 1, length, 3])
    completion_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    completion = completion.masked_fill(completion_mask == 0, PAD)
    return Rollout(ids, mask, completion, completion_mask, lengths == length, [""] * 6, PAD)


@pytest.mark.parametrize("chunk_logits", [2**24, 1000, 0, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_the_full_logits(chunk_logits, temperature):
    policy = tiny_policy()
    model = policy.model.train()
    rollout = varied_rollout(policy)
    for rows in (slice(0, 8), slice(3, 4), slice(1, 3)):
        micro = take(rollout, rows)
        got = value_and_grads(
            model,
            lambda m=micro: token_logprobs(
                model, m, temperature, True, entropy_grad=True, chunk_logits=chunk_logits
            ),
        )
        want = value_and_grads(model, lambda m=micro: plain_logprobs(model, m, temperature))
        assert_all_close(got, want, model, micro, temperature)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("length", [5, 20])  # fewer / more completion tokens than hidden units
def test_chunked_logprobs_for_each_architecture(kind, length):
    model = random_model(kind, kv_heads=2)
    rollout = random_rollout(length)
    got = value_and_grads(model, lambda: token_logprobs(model, rollout, 0.7, True, True, 900))
    want = value_and_grads(model, lambda: plain_logprobs(model, rollout, 0.7))
    assert_all_close(got, want, model, rollout, 0.7)


def test_the_head_in_vocabulary_chunks_is_as_accurate(monkeypatch):
    """Products of a few words at a time (the last chunk shorter) in the head's forward and
    weight gradient: values and gradients as accurate as the plain pass."""
    monkeypatch.setattr(logprobs, "HEAD_WORDS", 64)  # VOCAB 300: 4 chunks of 64, one of 44
    model = random_model("llama", kv_heads=2)
    rollout = random_rollout(20)
    got = value_and_grads(model, lambda: token_logprobs(model, rollout, 0.7, True, True, 900))
    want = value_and_grads(model, lambda: plain_logprobs(model, rollout, 0.7))
    assert_all_close(got, want, model, rollout, 0.7)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the claim is MKL's")
@pytest.mark.parametrize("keep", [True, False])  # log p kept for backward, or recomputed there
def test_vocabulary_chunks_give_the_bits_of_one_product(monkeypatch, keep):
    """What keeps the quickstart's numbers: the head's products in chunks of `HEAD_WORDS`
    words give the bits of one product (log-probs, entropies, both gradients), at SmolLM2's
    hidden size and the update's rows."""
    torch.manual_seed(0)
    words, rows = 3 * logprobs.HEAD_WORDS + 100, 128
    hidden = torch.randn(rows, 576, requires_grad=True)
    weight = (torch.randn(words, 576) * 0.05).requires_grad_()
    ids = torch.randint(0, words, (rows,))

    def run():
        chunk_rows = rows if keep else rows // 2
        logp, entropy = logprobs._ChunkedLogProbs.apply(hidden, weight, ids, 0.7, True, chunk_rows)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        out = [logp, entropy, hidden.grad, weight.grad]
        hidden.grad = weight.grad = None
        return out

    chunked = run()
    monkeypatch.setattr(logprobs, "HEAD_WORDS", words)  # one product
    for got, want in zip(chunked, run(), strict=True):
        assert torch.equal(got, want)


def exact(model, rollout: Rollout, temperature: float):
    """`plain_logprobs` values, entropies and gradients in float64: the reference."""
    double = copy.deepcopy(model).double()
    return value_and_grads(double, lambda: plain_logprobs(double, rollout, temperature))


def assert_as_accurate(got, plain, truth) -> None:
    """Each of `got`'s log-probs, entropies and parameter gradients is within the float32
    error of the plain pass (`plain`, against the float64 `truth`) times 4, plus 4 float32
    roundings of the tensor's largest value: a tolerance from float32 rounding at the
    tensors' scale on this CPU, not from one machine's output."""
    tensors = [(got[0], plain[0], truth[0]), (got[1], plain[1], truth[1])]
    assert len(got[2]) == len(plain[2]) == len(truth[2])
    tensors += list(zip(got[2], plain[2], truth[2], strict=True))
    eps = torch.finfo(torch.float32).eps
    for i, (g, p, t) in enumerate(tensors):
        plain_error = float((p.double() - t).abs().max())
        error = float((g.double() - t).abs().max())
        allowed = 4 * plain_error + 4 * eps * float(t.abs().max())
        assert error <= allowed, f"tensor {i}: error {error:.3g} > {allowed:.3g}"


def assert_all_close(got, want, model, rollout, temperature) -> None:
    """`got` and the plain pass `want` are equally accurate against float64."""
    assert_as_accurate(got, want, exact(model, rollout, temperature))


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
    assert_all_close(got, want, model, rollout, 1.0)


def shared_logprobs(
    model,
    rollout: Rollout,
    micro_batch_size: int,
    temperature: float = 0.7,
    max_tokens: int | None = None,
):
    """`value_and_grads` through `SharedPrompts`, backward per micro-batch as in an update
    (with `max_tokens`: the token budget's packed micro-batches), in the rollout's row order."""
    model.zero_grad(set_to_none=True)
    logps = torch.zeros(rollout.completion_ids.shape)
    entropies = torch.zeros(rollout.completion_ids.shape)
    plan = micro_batches(rollout, micro_batch_size, max_tokens, pack=max_tokens is not None)
    for chunk, micro in plan:
        prompts = SharedPrompts(model, rollout, chunk, temperature)
        assert prompts.share
        for part in micro:
            logp, entropy = prompts.logprobs(part, with_entropy=True, entropy_grad=True)
            (logp.sum() + 0.5 * entropy.sum()).backward()
            logps[rows_of(part)] = logp.detach()
            entropies[rows_of(part)] = entropy.detach()
        prompts.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return logps, entropies, grads


def grouped_rollout(length: int = 9, group: int = 3) -> Rollout:
    """Two groups of `group` rows (their prompts left-padded differently), completions of
    different lengths, one with its first token only."""
    ids, mask = prompt_batch(padded=True)
    ids, mask = ids[[0, 1]].repeat_interleave(group, 0), mask[[0, 1]].repeat_interleave(group, 0)
    torch.manual_seed(5)
    n = len(ids)
    completion = torch.randint(4, VOCAB, (n, length))
    lengths = torch.tensor([length, 1, 4, length - 2, 2, length][:n])
    completion_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    completion = completion.masked_fill(completion_mask == 0, PAD)
    return Rollout(ids, mask, completion, completion_mask, lengths == length, [""] * n, PAD)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("micro_batch_size", [1, 2, 3, 6])
def test_shared_prompts_equal_a_plain_forward_pass(kind, micro_batch_size):
    model = random_model(kind, kv_heads=2).train()
    rollout = grouped_rollout()
    sharing = shared_logprobs(model, rollout, micro_batch_size)
    plain = value_and_grads(model, lambda: plain_logprobs(model, rollout, 0.7))
    assert_all_close(sharing, plain, model, rollout, 0.7)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("budget", [40, 10_000])
def test_packed_micro_batches_equal_a_plain_forward_pass(kind, budget):
    """Completions run back to back in one sequence (bins), each seeing its prompt and its own
    tokens only: the log-probs, entropies and gradients of each completion alone."""
    model = random_model(kind, kv_heads=2).train()
    rollout = grouped_rollout()  # lengths 9 1 4 | 7 2 9: bins [9] [4 1] | [9] [7 2]
    assert can_pack(model)
    plan = micro_batches(rollout, 6, budget, pack=True)
    assert any(len(b) > 1 for _, micro in plan for m in micro for b in m.bins)
    packed = shared_logprobs(model, rollout, 6, max_tokens=budget)
    plain = value_and_grads(model, lambda: plain_logprobs(model, rollout, 0.7))
    assert_all_close(packed, plain, model, rollout, 0.7)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompts_on_the_tiny_policy(lora):
    """The real tokenizer's prompts (groups of 2), LoRA adapters, and a no-grad pass."""
    policy = tiny_policy(lora)
    model = policy.model.eval()  # no LoRA dropout: both passes see the same function
    rollout = varied_rollout(policy)
    sharing = shared_logprobs(model, rollout, 1)
    plain = value_and_grads(model, lambda: plain_logprobs(model, rollout, 0.7))
    truth = exact(model, rollout, 0.7)
    assert_as_accurate(sharing, plain, truth)
    for share in (True, False):
        logp, entropy = batch_logprobs(
            model, rollout, 0.7, batch_size=3, share_prompts=share, with_entropy=True
        )
        assert_as_accurate((logp, entropy, []), (plain[0], plain[1], []), (truth[0], truth[1], []))


def test_micro_batches_keep_groups_whole():
    rollout = grouped_rollout(group=3)  # rows 0-2 share a prompt, rows 3-5 another
    assert micro_batches(rollout, 1) == [
        (slice(0, 3), [slice(0, 1), slice(1, 2), slice(2, 3)]),
        (slice(3, 6), [slice(3, 4), slice(4, 5), slice(5, 6)]),
    ]
    assert micro_batches(rollout, 2) == [
        (slice(0, 3), [slice(0, 2), slice(2, 3)]),
        (slice(3, 6), [slice(3, 5), slice(5, 6)]),
    ]
    assert micro_batches(rollout, 4) == [(slice(0, 3), [slice(0, 3)]), (slice(3, 6), [slice(3, 6)])]
    assert micro_batches(rollout, 6) == [(slice(0, 6), [slice(0, 6)])]


def test_no_sharing_with_gradient_checkpointing_or_other_models():
    policy = tiny_policy()
    rollout = varied_rollout(policy)
    policy.model.gradient_checkpointing_enable()
    assert not SharedPrompts(policy.model.train(), rollout).share
    assert SharedPrompts(policy.model.eval(), rollout).share  # no checkpointing in eval mode
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert not SharedPrompts(gpt2, random_rollout()).share


@pytest.mark.parametrize("pack", [False, True])
def test_token_budget_micro_batches_pack_rows_of_similar_length(pack):
    rollout = varied_rollout(tiny_policy())  # groups of 2, lengths 12 3 | 7 1 | 12 5 | 9 2
    prompt = rollout.prompt_mask.sum(1).tolist()
    length = rollout.completion_mask.sum(1).tolist()
    group = [r // 2 for r in range(8)]
    for budget in (1, 40, 60, 120, 10_000):
        plan = micro_batches(rollout, 8, max_tokens=budget, pack=pack)
        rows = [r for _, micro in plan for m in micro for r in m.rows]
        assert sorted(rows) == list(range(8))  # every row once
        for chunk, micro in plan:
            assert chunk.start % 2 == 0 and chunk.stop % 2 == 0  # whole groups
            width = max(prompt[chunk])
            capacity = max(length[chunk])
            sizes = []
            for m in micro:
                assert all(chunk.start <= r < chunk.stop for r in m.rows)
                size = [sum(length[r] for r in b) for b in m.bins]
                assert all(len({group[r] for r in b}) == 1 for b in m.bins)  # one prompt a bin
                assert max(size) <= capacity and (pack or max(map(len, m.bins)) == 1)
                assert len(m.bins) == 1 or len(m.bins) * (width + max(size)) <= budget
                sizes.append(max(size))
            assert sizes == sorted(sizes, reverse=True)  # longest bins first
    assert len(micro_batches(rollout, 8, max_tokens=10_000)) == 1  # all in one chunk
    assert all(len(m.bins) == 1 for _, micro in micro_batches(rollout, 8, 1) for m in micro)


def test_packing_leaves_less_padding():
    """Per group, bins of at most the longest completion: 12 3 -> [12] [3] (nothing fits with
    12), 7 1 -> [7 1], 12 5 -> [12] [5], 9 2 -> [9 2]; in one chunk, 6 bins of at most 12
    tokens instead of 8 rows."""
    rollout = varied_rollout(tiny_policy())
    length = rollout.completion_mask.sum(1).tolist()
    ((_, plain),) = micro_batches(rollout, 8, max_tokens=10_000)
    ((_, packed),) = micro_batches(rollout, 8, max_tokens=10_000, pack=True)
    assert [len(m.bins) for m in plain] == [8]
    bins = sorted(sorted(length[r] for r in b) for m in packed for b in m.bins)
    assert bins == [[1, 7], [2, 9], [3], [5], [12], [12]]


def test_a_token_budget_plan_splits_to_the_count_another_rank_has(monkeypatch):
    """FSDP's ranks must run as many micro-batches: given a larger count from the other ranks
    (the collective's answer, here as another rank would give it), the largest micro-batches
    split until the counts agree, every row still once; a bin of several rows splits too."""
    rollout = varied_rollout(tiny_policy())
    for pack in (False, True):
        plan = micro_batches(rollout, 8, max_tokens=10_000, pack=pack)
        own = len([m for _, micro in plan for m in micro])
        monkeypatch.setattr("grpo.distributed.max_over_ranks", lambda value, extra=7: value + extra)
        plan = micro_batches(rollout, 8, max_tokens=10_000, pack=pack)
        monkeypatch.undo()
        micro = [m for _, chunk in plan for m in chunk]
        assert len(micro) == own + 7 and all(m.rows for m in micro)
        assert sorted(r for m in micro for r in m.rows) == list(range(8))


@pytest.mark.parametrize("share", [True, False])
def test_environment_tokens_are_read_but_not_scored(rollout, share):
    """A trajectory's environment tokens are context for the model's later tokens, whose
    log-probs and entropies are those of the whole sequence; they themselves get 0 (no LM head
    runs there), in the chunked head, the full-logits pass and the shared prompt pass."""
    traj = trajectories(rollout)
    model = tiny_policy().model.eval()
    mine = traj.model_mask.bool()
    env = traj.completion_mask.bool() & ~mine
    whole = dataclasses.replace(traj, loss_mask=None)
    want, want_entropy = token_logprobs(model, whole, with_entropy=True, chunk_logits=None)
    with torch.no_grad():
        results = [
            token_logprobs(model, traj, with_entropy=True, chunk_logits=None),
            token_logprobs(model, traj, with_entropy=True),
            batch_logprobs(model, traj, 1.0, 4, share, with_entropy=True),
        ]
    for logp, entropy in results:
        assert not logp[env].any() and not entropy[env].any()
        torch.testing.assert_close(logp[mine], want[mine], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy[mine], want_entropy[mine], rtol=1e-5, atol=1e-5)
