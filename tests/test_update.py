"""Policy updates on the real tiny model: mu epochs, mini-batches, old log-probs, overlong
masking, entropy bonus, reference updates, and the speed and memory switches that must not
change a run (micro-batches, shared prompts, no reference at kl 0, the offloaded reference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY, read_metrics, run_train, tiny_policy

from grpo.logprobs import token_logprobs
from grpo.loss import GRPOLoss
from grpo.rollout import generate, render_prompts
from grpo.update import loss_mask, make_reference, normalisers, policy_update
from grpo.validation import ConfigError

ROWS = 8  # 2 prompts x G = 4


@pytest.fixture(scope="module")
def rollout():
    policy = tiny_policy()
    questions = ["Ava has 3 apples and gets 4 more. How many?", "Ben buys 2 bags of 5 pens."]
    prompts = render_prompts(policy.tokenizer, questions, False)
    torch.manual_seed(1)
    return generate(policy.model, policy.tokenizer, prompts, 4, max_new_tokens=6)


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0, -0.5, 0.5])


def update(
    policy,
    rollout,
    *,
    lr=1e-2,
    optimizer=torch.optim.AdamW,
    advantages=ADVANTAGES,
    loss=None,
    reference=None,
    micro_batch_size=4,
    **kwargs,
):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    loss_fn = loss or GRPOLoss(kl_coef=0.0)
    return policy_update(
        policy,
        rollout,
        advantages,
        loss_fn,
        optimizer(params, lr=lr),
        reference,
        micro_batch_size,
        1.0,
        1.0,
        **kwargs,
    )


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def snapshot(policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.model.parameters()]


def unchanged(policy, before) -> bool:
    return all(torch.equal(p, b) for p, b in zip(policy.model.parameters(), before, strict=True))


@pytest.mark.parametrize("share", [False, True])
def test_one_step_is_on_policy_with_no_extra_forward(rollout, share):
    policy = tiny_policy()
    calls = count_forwards(policy.model)
    stats = update(policy, rollout, share_prompts=share)
    # One forward per micro-batch of 4 (a group), and one per prompt when shared; no old pass.
    assert calls[0] == (ROWS // 4) * (2 if share else 1)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_std"] == 0.0
    assert stats["clip_fraction"] == 0.0 and stats["optimizer_steps"] == 1.0


def test_several_epochs_move_the_ratios_and_engage_the_clip(rollout):
    policy = tiny_policy()
    old, _ = token_logprobs(policy.model.eval(), rollout)  # the sampling policy
    calls = count_forwards(policy.model)
    stats = update(policy, rollout, epochs=4, share_prompts=False)
    # Old log-probs once (2 micro-batches), then 4 epochs x 2 micro-batches.
    assert calls[0] == 2 + 4 * 2
    assert stats["optimizer_steps"] == 4.0
    assert stats["ratio_std"] > 0.01 and stats["clip_fraction"] > 0.05
    new, _ = token_logprobs(policy.model.eval(), rollout)
    ratio = torch.exp(new - old)[rollout.completion_mask.bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).any()  # moved past the clip range from the old policy


def test_old_logprobs_are_the_sampling_policys(rollout):
    # Two optimiser steps that change nothing (lr 0): the old log-probs, taken once in eval mode
    # before the first step, match the training forward passes, so every ratio is 1.
    policy = tiny_policy()
    stats = update(policy, rollout, num_mini_batches=2, lr=0.0)
    assert stats["optimizer_steps"] == 2.0
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ratio_std"] < 1e-6 and stats["clip_fraction"] == 0.0


def test_micro_batch_size_does_not_change_the_update(rollout):
    results = []
    for micro_batch_size in (1, 3, 8):
        policy = tiny_policy()
        update(
            policy,
            rollout,
            optimizer=torch.optim.SGD,
            lr=0.1,
            epochs=2,
            micro_batch_size=micro_batch_size,
            loss=GRPOLoss(kl_coef=0.0, aggregation="token_mean"),
        )
        results.append(snapshot(policy))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("epochs", "mini_batches"), [(0, 1), (1, 3), (1, 0)])
def test_bad_epochs_or_mini_batches_name_the_key(rollout, epochs, mini_batches):
    key = "update_epochs" if epochs < 1 else "num_mini_batches"
    with pytest.raises(ConfigError, match=f"algorithm.{key}"):
        update(tiny_policy(), rollout, epochs=epochs, num_mini_batches=mini_batches)


def test_masked_truncated_completions_get_no_gradient(rollout):
    truncated = torch.tensor([True, False] * 4)
    cut = dataclasses.replace(rollout, truncated=truncated)
    mask = loss_mask(cut, mask_truncated=True)
    assert not mask[truncated].any()
    assert torch.equal(mask[~truncated], rollout.completion_mask.bool()[~truncated])
    assert normalisers(mask) == {"num_sequences": 4, "num_tokens": int(mask.sum())}
    # Only truncated rows carry an advantage: masked, nothing moves (SGD, no KL).
    only_truncated = torch.where(truncated, ADVANTAGES, 0.0)
    for masked, moves in ((True, False), (False, True)):
        policy = tiny_policy()
        before = snapshot(policy)
        update(
            policy, cut, optimizer=torch.optim.SGD, advantages=only_truncated, mask_truncated=masked
        )
        assert unchanged(policy, before) != moves


def test_all_truncated_and_masked_takes_no_step(rollout):
    policy = tiny_policy()
    before = snapshot(policy)
    cut = dataclasses.replace(rollout, truncated=torch.ones(ROWS, dtype=torch.bool))
    stats = update(policy, cut, mask_truncated=True)
    assert stats == {"optimizer_steps": 0.0}
    assert unchanged(policy, before)


@pytest.mark.parametrize(("coef", "moves"), [(0.0, False), (0.1, True)])
def test_entropy_bonus_has_a_gradient(rollout, coef, moves):
    policy = tiny_policy()
    before = snapshot(policy)
    loss = GRPOLoss(kl_coef=0.0, entropy_coef=coef)
    stats = update(
        policy, rollout, optimizer=torch.optim.SGD, advantages=torch.zeros(ROWS), loss=loss
    )
    assert unchanged(policy, before) != moves
    assert stats["entropy_mean"] > 0 and (stats["entropy_bonus"] > 0) == moves


def test_reference_mix_and_reset(rollout):
    policy = tiny_policy()
    reference = make_reference(policy, 1.0, every=2, mix=0.5)
    start = snapshot(policy)
    update(policy, rollout, loss=GRPOLoss(kl_coef=0.04), reference=reference)
    reference.maybe_update(1)  # not due
    assert all(torch.equal(r, s) for r, s in zip(reference.model.parameters(), start, strict=True))
    reference.maybe_update(2)  # halfway from the start to the policy
    for r, s, p in zip(reference.model.parameters(), start, policy.model.parameters(), strict=True):
        torch.testing.assert_close(r, (s + p.detach()) / 2)
    reset = make_reference(policy, 1.0, every=1, mix=1.0)
    update(policy, rollout, loss=GRPOLoss(kl_coef=0.04), reference=reset)
    reset.maybe_update(1)
    assert all(
        torch.equal(r, p)
        for r, p in zip(reset.model.parameters(), policy.model.parameters(), strict=True)
    )
    want = token_logprobs(policy.model.eval(), rollout)[0]
    assert torch.equal(reset(rollout, share_prompts=False), want)
    torch.testing.assert_close(reset(rollout), want)  # the prompts' pass shared


@pytest.mark.parametrize(
    ("lora", "kwargs", "message"),
    [
        (True, {"every": 5}, "every=5: reference updates need full fine-tuning"),
        (False, {"every": -1}, "every=-1"),
        (False, {"every": 1, "mix": 0.0}, "mix=0.0"),
    ],
)
def test_bad_reference_update_names_the_key(lora, kwargs, message):
    with pytest.raises(ConfigError, match=f"algorithm.reference_update.{message}"):
        make_reference(tiny_policy(lora), 1.0, **kwargs)


def test_no_reference_forward_at_kl_zero_gives_the_same_update(rollout):
    """Skipping the reference (kl_coef = 0) changes nothing but the KL statistics."""
    results = []
    for with_reference in (True, False):
        policy = tiny_policy()
        reference = make_reference(policy, 1.0) if with_reference else None
        stats = update(policy, rollout, reference=reference)
        results.append((stats, snapshot(policy)))
    (with_ref, params_ref), (without, params) = results
    assert "kl_mean" in with_ref and "kl_mean" not in without
    for key in ("total_loss", "policy_loss", "grad_norm", "entropy_mean"):
        assert with_ref[key] == pytest.approx(without[key], rel=1e-6, abs=1e-9), key
    for a, b in zip(params_ref, params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


MB1, EVERY1 = "trainer.micro_batch_size=1", "algorithm.reference_update.every=1"


@pytest.mark.parametrize(
    ("base", "switched"),
    [
        ((), ("trainer.micro_batch_size=1",)),
        ((MB1,), (MB1, "trainer.share_prompts=false")),
        ((EVERY1,), (EVERY1, "trainer.offload_reference=true")),
    ],
    ids=["micro-batches", "shared-prompts", "offload-reference"],
)
def test_switches_leave_a_short_run_unchanged(tmp_path, base, switched):
    """A 2-step tiny CLI run (full fine-tuning, KL on, prompts shared, micro-batches of 4) logs
    the same loss, KL, gradient norm and rewards with each switch."""
    runs = []
    for name, overrides in (("base", base), ("switched", switched)):
        run_dir = tmp_path / name
        run_train(*TINY, *overrides, f"hydra.run.dir={run_dir}")
        runs.append([m for m in read_metrics(run_dir) if "train/total_loss" in m])
    for before, after in zip(*runs, strict=True):
        for key in ("train/total_loss", "train/kl_mean", "train/grad_norm", "rewards/mean"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key


def test_inference_batch_size_does_not_change_the_update(rollout):
    """Reference and old log-probs one completion at a time or all at once: the same update."""
    results = []
    for size in (1, None):
        policy = tiny_policy()
        reference = make_reference(policy, 1.0)
        loss = GRPOLoss(kl_coef=0.04)
        settings = {"epochs": 2, "inference_batch_size": size, "optimizer": torch.optim.SGD}
        stats = update(policy, rollout, loss=loss, reference=reference, **settings)
        results.append((stats, snapshot(policy)))
    (one, params_one), (whole, params_whole) = results
    for key in ("total_loss", "kl_mean", "grad_norm", "ratio_mean"):
        assert one[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(params_one, params_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [0, 1])
def test_offloaded_reference_gives_the_same_update(rollout, every):
    """The offloaded reference's weights are the same numbers, read back from its file: the
    same update, bit for bit, and reference updates (mix) land in the file."""
    results = []
    for offload in (False, True):
        policy = tiny_policy()
        reference = make_reference(policy, 1.0, every=every, mix=0.5, offload=offload)
        if offload:
            assert all(p.numel() == 0 for p in reference.model.parameters())  # not in memory
        for step in (1, 2):
            stats = update(policy, rollout, loss=GRPOLoss(kl_coef=0.04), reference=reference)
            reference.maybe_update(step)
        with reference.weights():
            results.append((stats, snapshot(policy), snapshot(reference)))
    (stats, params, ref), (offloaded, offloaded_params, offloaded_ref) = results
    assert stats == offloaded
    for a, b in zip(params + ref, offloaded_params + offloaded_ref, strict=True):
        assert torch.equal(a, b)


def test_offloading_a_lora_reference_names_the_key():
    with pytest.raises(ConfigError, match="trainer.offload_reference=true"):
        make_reference(tiny_policy(lora=True), 1.0, offload=True)
