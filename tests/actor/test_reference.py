"""The reference policy: the base with adapters off (LoRA) or a frozen copy, soft and hard
reference updates (TR-DPO, DeepSeekMath Algorithm 1), and the copy offloaded to a file."""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot, tiny_policy, update

from grpo.actor.logprobs import token_logprobs
from grpo.actor.reference import Reference
from grpo.algorithm.loss import GRPOLoss


def test_reference_mix_and_reset(rollout):
    policy = tiny_policy()
    reference = Reference(policy, 1.0, every=2, mix=0.5)
    start = snapshot(policy)
    update(policy, rollout, loss=GRPOLoss(kl={"coef": 0.04}), reference=reference)
    reference.maybe_update(1)  # not due
    assert all(torch.equal(r, s) for r, s in zip(reference.model.parameters(), start, strict=True))
    reference.maybe_update(2)  # halfway from the start to the policy
    for r, s, p in zip(reference.model.parameters(), start, policy.model.parameters(), strict=True):
        torch.testing.assert_close(r, (s + p.detach()) / 2)
    reset = Reference(policy, 1.0, every=1, mix=1.0)
    update(policy, rollout, loss=GRPOLoss(kl={"coef": 0.04}), reference=reset)
    reset.maybe_update(1)
    assert all(
        torch.equal(r, p)
        for r, p in zip(reset.model.parameters(), policy.model.parameters(), strict=True)
    )
    want = token_logprobs(policy.model.eval(), rollout)[0]
    assert torch.equal(reset(rollout, share_prompts=False), want)
    torch.testing.assert_close(reset(rollout), want)  # the prompts' pass shared


@pytest.mark.parametrize("every", [0, 1])
def test_offloaded_reference_gives_the_same_update(rollout, every):
    """The offloaded reference's weights are the same numbers, read back from its file: the
    same update, bit for bit, and reference updates (mix) land in the file."""
    results = []
    for offload in (False, True):
        policy = tiny_policy()
        reference = Reference(policy, 1.0, every=every, mix=0.5, offload=offload)
        if offload:
            assert all(p.numel() == 0 for p in reference.model.parameters())  # not in memory
        for step in (1, 2):
            stats = update(policy, rollout, loss=GRPOLoss(kl={"coef": 0.04}), reference=reference)
            reference.maybe_update(step)
        with reference.weights():
            results.append((stats, snapshot(policy), snapshot(reference)))
    (stats, params, ref), (offloaded, offloaded_params, offloaded_ref) = results
    assert stats == offloaded
    for a, b in zip(params + ref, offloaded_params + offloaded_ref, strict=True):
        assert torch.equal(a, b)
