"""Policy updates on the real tiny model: mu epochs, mini-batches, old log-probs, overlong
masking, entropy bonus, top-entropy tokens, and the speed and memory switches that must not
change a run (micro-batches, shared prompts, no reference at kl 0, the offloaded reference)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (
    ADVANTAGES,
    ROWS,
    make_actor,
    snapshot,
    step_lines,
    tiny_policy,
    trajectories,
    update,
)

from grpo.actor.logprobs import token_logprobs
from grpo.actor.reference import Reference
from grpo.actor.update import loss_mask, normalisers, top_entropy_tokens
from grpo.algorithm.loss import AGGREGATIONS, GRPOLoss


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


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
            loss=GRPOLoss(kl={"coef": 0.0}, aggregation="token_mean"),
        )
        results.append(snapshot(policy))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share", [True, False])
def test_a_token_budget_does_not_change_the_update(rollout, share):
    """Micro-batches by token budget (rows sorted by length) against fixed ones: the same
    normalisers, so the same update to float tolerance."""
    lengths = torch.tensor([6, 1, 4, 2, 5, 3, 6, 2]).clamp(max=rollout.completion_ids.shape[1])
    mask = (torch.arange(rollout.completion_ids.shape[1])[None] < lengths[:, None]).long()
    varied = dataclasses.replace(rollout, completion_mask=mask * rollout.completion_mask)
    results = []
    for budget in (None, 1, 40, 100):
        policy = tiny_policy()
        update(
            policy,
            varied,
            optimizer=torch.optim.SGD,
            lr=0.1,
            micro_batch_size=8,
            micro_batch_tokens=budget,
            share_prompts=share,
            loss=GRPOLoss(kl={"coef": 0.0}, entropy_coef=0.01),
        )
        results.append(snapshot(policy))
    start = snapshot(tiny_policy())
    moved = max((a - b).abs().max() for a, b in zip(results[0], start, strict=True))
    assert moved > 1e-4
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
    loss = GRPOLoss(kl={"coef": 0.0}, entropy_coef=coef)
    stats = update(
        policy, rollout, optimizer=torch.optim.SGD, advantages=torch.zeros(ROWS), loss=loss
    )
    assert unchanged(policy, before) != moves
    assert stats["entropy_mean"] > 0 and (stats["entropy_bonus"] > 0) == moves


def test_no_reference_forward_at_kl_zero_gives_the_same_update(rollout):
    """Skipping the reference (kl_coef = 0) changes nothing but the KL statistics."""
    results = []
    for with_reference in (True, False):
        policy = tiny_policy()
        reference = Reference(policy, 1.0) if with_reference else None
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
def test_switches_leave_a_short_run_unchanged(tiny_train, base, switched):
    """A 2-step tiny run (full fine-tuning, KL on, prompts shared, one micro-batch) logs the
    same loss, KL, gradient norm and rewards with each switch."""
    runs = []
    for name, overrides in (("base", base), ("switched", switched)):
        run_dir, _ = tiny_train(*overrides, "eval.comparison.at_end=false", name=name)
        runs.append(step_lines(run_dir))
    for before, after in zip(*runs, strict=True):
        for key in ("train/total_loss", "train/kl_mean", "train/grad_norm", "rewards/mean"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key


def test_inference_batch_size_does_not_change_the_update(rollout):
    """Reference and old log-probs one completion at a time or all at once: the same update."""
    results = []
    for size in (1, None):
        policy = tiny_policy()
        reference = Reference(policy, 1.0)
        loss = GRPOLoss(kl={"coef": 0.04})
        settings = {"epochs": 2, "inference_batch_size": size, "optimizer": torch.optim.SGD}
        stats = update(policy, rollout, loss=loss, reference=reference, **settings)
        results.append((stats, snapshot(policy)))
    (one, params_one), (whole, params_whole) = results
    for key in ("total_loss", "kl_mean", "grad_norm", "ratio_mean"):
        assert one[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(params_one, params_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_keeping_freed_memory_gives_the_same_update_bit_for_bit(rollout):
    """`keep_freed_memory` (grpo.heap.kept) changes where tensors live, not what they hold."""
    results = []
    for keep in (False, True):
        policy = tiny_policy()
        stats = update(policy, rollout, micro_batch_size=2, keep_freed_memory=keep)
        results.append((stats, snapshot(policy)))
    (stats_off, params_off), (stats_on, params_on) = results
    assert stats_on == stats_off
    for a, b in zip(params_off, params_on, strict=True):
        assert torch.equal(a, b)


def test_top_entropy_tokens_are_the_batch_quantile():
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.0], [0.3, 0.7, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    selected = top_entropy_tokens(entropy, mask, rho=0.4)  # 2 of the 5 valid tokens
    assert selected.tolist() == [[False, False, True, False], [False, True, False, False]]


def test_top_entropy_selection_leaves_the_other_tokens_without_policy_gradient(rollout):
    policy = tiny_policy()
    loss = GRPOLoss(kl={"coef": 0.0}, top_entropy_quantile=0.25)
    stats = update(policy, rollout, loss=loss, optimizer=torch.optim.SGD)
    assert stats["masked_fraction"] == pytest.approx(0.75, abs=0.1)


def test_a_trajectory_loss_and_gradient_are_over_the_model_tokens_alone(rollout):
    """Two-turn trajectories: the update's loss and gradient are DeepSeekMath eq. 3 written out
    by hand over the model's tokens, the environment's tokens read as context only."""
    traj = trajectories(rollout)
    mine = traj.model_mask.bool()
    hand = tiny_policy()
    hand.model.train()
    logp, _ = token_logprobs(hand.model, dataclasses.replace(traj, loss_mask=None))
    per_token = -ADVANTAGES[:, None] * torch.exp(logp - logp.detach())
    grads = []
    for tokens in (traj.completion_mask.bool(), mine):
        want = ((per_token * tokens).sum(1) / tokens.sum(1)).mean()
        grads.append(torch.autograd.grad(want, list(hand.model.parameters()), retain_graph=True))
    every, want_grad = grads
    assert any(not torch.allclose(a, b) for a, b in zip(every, want_grad, strict=True))
    policy = tiny_policy()
    before = snapshot(policy)
    stats = update(policy, traj, optimizer=torch.optim.SGD, lr=1.0, max_grad_norm=None)
    assert stats["total_loss"] == pytest.approx(want.item(), rel=1e-6)
    for p, b, g in zip(policy.model.parameters(), before, want_grad, strict=True):
        torch.testing.assert_close(b - p, g, rtol=1e-4, atol=1e-6)


def test_environment_tokens_have_no_logprobs_and_no_say(rollout):
    """The old, reference and engine log-probs and the top-entropy selection on the
    environment's tokens change nothing: the same update, bit for bit, with junk there."""
    traj = trajectories(rollout)
    env = traj.completion_mask.bool() & ~traj.model_mask.bool()
    torch.manual_seed(4)
    engine, _ = token_logprobs(tiny_policy().model.eval(), traj)
    engine = engine + 0.01 * torch.randn(engine.shape) * traj.model_mask
    traj = dataclasses.replace(traj, sampling_logprobs=engine)
    results = []
    for junk in (None, 3.0):
        policy = tiny_policy()
        loss = GRPOLoss(
            kl={"coef": 0.1},
            entropy_coef=0.01,
            top_entropy_quantile=0.5,
            rollout_correction={"name": "sequence_mask"},
        )
        params = [p for p in policy.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1)
        actor = make_actor(policy, loss, Reference(policy, 1.0), optimizer, epochs=2)
        scores = actor.score(traj)
        batch = traj
        if junk is None:
            assert not scores.old[env].any() and not scores.ref[env].any()
            assert not scores.selected[env].any() and scores.selected.any()
        else:
            scores.old, scores.ref = (
                scores.old.masked_fill(env, junk),
                scores.ref.masked_fill(env, -junk),
            )
            scores.selected = scores.selected | env
            batch = dataclasses.replace(traj, sampling_logprobs=engine.masked_fill(env, junk))
        stats = actor.update(batch, ADVANTAGES, scores)
        results.append((stats, snapshot(policy)))
    (stats, params), (junk_stats, junk_params) = results
    assert stats["rollout_corrected_fraction"] > 0 and stats["kl_mean"] > 0
    assert stats == junk_stats
    assert all(torch.equal(a, b) for a, b in zip(params, junk_params, strict=True))


def _trained(batch, aggregation: str) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Stats and parameters after 2 epochs on `batch` (KL, entropy bonus) with `aggregation`."""
    policy = tiny_policy()
    loss = GRPOLoss(
        kl={"coef": 0.1}, entropy_coef=0.01, aggregation=aggregation, max_completion_length=12
    )
    reference = Reference(policy, 1.0)
    stats = update(
        policy, batch, loss=loss, reference=reference, optimizer=torch.optim.SGD, lr=0.1, epochs=2
    )
    return stats, snapshot(policy)


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_environment_tokens_at_the_end_are_padding_to_the_loss(rollout, aggregation):
    """Environment tokens last in each trajectory, or the same positions as padding: the same
    loss, statistics and update for every aggregation (their normalisers count model tokens)."""
    traj = trajectories(rollout, env_at_end=True)
    padded = dataclasses.replace(
        traj,
        completion_ids=traj.completion_ids.masked_fill(~traj.model_mask.bool(), traj.pad_token_id),
        completion_mask=traj.model_mask,
        loss_mask=None,
    )
    (stats, params), (want_stats, want_params) = (
        _trained(traj, aggregation),
        _trained(padded, aggregation),
    )
    assert stats == pytest.approx(want_stats, rel=1e-5, abs=1e-7)
    for a, b in zip(params, want_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_without_a_loss_mask_every_completion_token_is_the_models(rollout, aggregation):
    """No `loss_mask` (one turn) is the completion mask itself, so the update is today's: bit
    for bit the same as with a mask of ones."""
    assert rollout.loss_mask is None and rollout.model_mask is rollout.completion_mask
    ones = dataclasses.replace(rollout, loss_mask=torch.ones_like(rollout.completion_mask))
    (stats, params), (want_stats, want_params) = (
        _trained(ones, aggregation),
        _trained(rollout, aggregation),
    )
    assert stats == want_stats
    assert all(torch.equal(a, b) for a, b in zip(params, want_params, strict=True))
