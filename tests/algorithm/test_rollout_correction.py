"""The rollout-vs-training correction: every registered entry (enumerated), each against its
formula on fixed tensors, and the mismatch statistics the loss logs."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm.loss import GRPOLoss
from grpo.algorithm.rollout_correction import ROLLOUT_CORRECTIONS, mismatch_stats

NAMES = list(ROLLOUT_CORRECTIONS)
# Token ratios pi_old / pi_engine of two completions (the second has 2 valid tokens).
RATIOS = torch.tensor([[0.4, 1.0, 3.0], [1.5, 1.2, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False]])
ENGINE = torch.log(torch.tensor([[0.3, 0.5, 0.1], [0.2, 0.4, 0.6]], dtype=torch.float64))
OLD = ENGINE + RATIOS.log()


def weights(name: str, **settings) -> list[float]:
    return ROLLOUT_CORRECTIONS[name](OLD, ENGINE, MASK, **settings).flatten().tolist()


def test_each_correction_equals_its_formula():
    assert weights("none") == [1.0] * 6
    assert weights("token_truncate", cap=2.0) == pytest.approx([0.4, 1.0, 2.0, 1.5, 1.2, 1.0])
    assert weights("token_mask", low=0.5, high=2.0) == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    # Sequence ratios: 0.4 * 1 * 3 = 1.2; 1.5 * 1.2 = 1.8 (the padded 7 does not count).
    assert weights("sequence_truncate", cap=1.5) == pytest.approx([1.2] * 3 + [1.5] * 3)
    assert weights("sequence_mask", low=0.5, high=1.5) == [1.0] * 3 + [0.0] * 3


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_detached_nonnegative_and_one_without_mismatch(name):
    old = OLD.clone().requires_grad_()
    w = ROLLOUT_CORRECTIONS[name](old, ENGINE, MASK)
    assert not w.requires_grad and w.shape == OLD.shape and (w >= 0).all()
    same = ROLLOUT_CORRECTIONS[name](ENGINE, ENGINE, MASK)
    assert torch.equal(same, torch.ones_like(same))


def test_mismatch_statistics():
    stats = mismatch_stats(OLD, ENGINE, MASK)
    d = [math.log(r) for r in (0.4, 1.0, 3.0, 1.5, 1.2)]
    assert stats["rollout_logprob_diff"] == pytest.approx(sum(map(abs, d)) / 5)
    assert stats["rollout_kl_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 5)


def test_the_loss_weights_its_policy_term_and_logs_the_mismatch():
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    logp = OLD.clone().requires_grad_()
    plain = GRPOLoss(kl={"coef": 0.0})
    masked = GRPOLoss(kl={"coef": 0.0}, rollout_correction={"name": "token_mask"})
    _, stats = plain(logp, None, None, advantages, MASK, sampling_logprobs=ENGINE)
    assert stats["rollout_corrected_fraction"] == 0.0 and stats["rollout_kl_k3"] > 0
    loss, stats = masked(logp, None, None, advantages, MASK, sampling_logprobs=ENGINE)
    loss.backward()
    assert stats["rollout_corrected_fraction"] == pytest.approx(2 / 5)
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 1] != 0
