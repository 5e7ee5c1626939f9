"""The rollout-vs-training correction: every registered entry (enumerated) against its formula
written out over python floats, the mismatch statistics the loss logs, and the two off-policy
losses of asynchronous training (AReaL's decoupled PPO, the engine's log-probs as pi_old)
against their peers' formulas written out on the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm.loss import GRPOLoss
from grpo.algorithm.rollout_correction import ROLLOUT_CORRECTIONS, mismatch_stats

NAMES = list(ROLLOUT_CORRECTIONS)
# Token ratios pi_old / pi_engine of three completions (the second has 2 valid tokens, the third
# 2 tokens without mismatch: its ratios and its product are exactly 1, to test the bounds).
RATIOS = torch.tensor([[0.4, 1.0, 3.0], [1.5, 1.2, 7.0], [1.0, 1.0, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
ENGINE = torch.log(
    torch.tensor([[0.3, 0.5, 0.1], [0.2, 0.4, 0.6], [0.7, 0.9, 0.2]], dtype=torch.float64)
)
OLD = ENGINE + RATIOS.log()


def inside(w: float, low: float, high: float) -> bool:
    return low <= w <= high


# Each entry's weight of a token, from its ratio w_t and its completion's W_i = prod_t w_t.
FORMULAS = {
    "none": lambda w, big_w: 1.0,
    "token_truncate": lambda w, big_w, cap: min(w, cap),
    "token_mask": lambda w, big_w, low, high: w if inside(w, low, high) else 0.0,
    "token_reject": lambda w, big_w, low, high: 1.0 if inside(w, low, high) else 0.0,
    "sequence_truncate": lambda w, big_w, cap: min(big_w, cap),
    "sequence_mask": lambda w, big_w, low, high: big_w if inside(big_w, low, high) else 0.0,
    "sequence_reject": lambda w, big_w, low, high: 1.0 if inside(big_w, low, high) else 0.0,
    "decoupled": lambda w, big_w, cap: w if w <= cap else 0.0,
}
# Settings: the defaults, ranges that cut through the batch, and bounds equal to a ratio of 1
# (token (0, 1), completion 2) that must keep it (inclusive bounds).
SETTINGS = {
    "none": [{}],
    "token_truncate": [{}, {"cap": 1.3}, {"cap": 1.0}],
    "sequence_truncate": [{}, {"cap": 1.5}, {"cap": 1.0}],
    "decoupled": [{}, {"cap": 1.3}, {"cap": 1.0}],
}
RANGES = [{}, {"low": 1.0, "high": 1.4}, {"low": 0.3, "high": 1.0}, {"low": 1.25, "high": 1.9}]
CASES = [(name, s) for name in NAMES for s in SETTINGS.get(name, RANGES)]


def reference(name: str, settings: dict) -> list[list[float]]:
    """The entry's weight of each valid token, written out over python floats (float64)."""
    defaults = {k: p.default for k, p in ROLLOUT_CORRECTIONS.settings(name).items()}
    formula = FORMULAS[name]
    out = []
    for old, engine, valid in zip(OLD.tolist(), ENGINE.tolist(), MASK.tolist(), strict=True):
        ratios = [math.exp(o - e) for o, e, v in zip(old, engine, valid, strict=True) if v]
        big_w = math.exp(sum(math.log(w) for w in ratios))
        out.append([formula(w, big_w, **{**defaults, **settings}) for w in ratios])
    return out


def test_every_entry_has_a_written_out_formula():
    assert set(FORMULAS) == set(NAMES)


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_each_correction_equals_its_formula(name, settings):
    weights = ROLLOUT_CORRECTIONS[name](OLD, ENGINE, MASK, **settings)
    got = [weights[i][MASK[i]].tolist() for i in range(len(MASK))]
    for row, expected in zip(got, reference(name, settings), strict=True):
        assert row == pytest.approx(expected, rel=1e-12, abs=0)


def flat(rows: list[list[float]]) -> list[float]:
    return [w for row in rows for w in row]


def test_the_cases_cut_through_the_batch():
    """The formulas are checked where it matters: masks drop some tokens and keep others with
    weights other than 1, and a ratio equal to a bound is kept."""
    assert flat(reference("token_mask", {})) == pytest.approx([0, 1, 0, 1.5, 1.2, 1, 1])
    assert flat(reference("token_reject", {"low": 1.0, "high": 1.4})) == [0, 1, 0, 0, 1, 1, 1]
    # W = 0.4 * 1 * 3 = 1.2, 1.5 * 1.2 = 1.8 (the padded 7 does not count) and 1.
    sequence = flat(reference("sequence_mask", {"low": 1.0, "high": 1.4}))
    assert sequence == pytest.approx([1.2] * 3 + [0] * 2 + [1] * 2)
    assert flat(reference("sequence_reject", {"low": 0.3, "high": 1.0})) == [0] * 5 + [1] * 2


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_detached_nonnegative_and_one_without_mismatch(name):
    old = OLD.clone().requires_grad_()
    w = ROLLOUT_CORRECTIONS[name](old, ENGINE, MASK)
    assert not w.requires_grad and w.shape == OLD.shape and (w >= 0).all()
    same = ROLLOUT_CORRECTIONS[name](ENGINE, ENGINE, MASK)
    assert torch.equal(same, torch.ones_like(same))


def test_mismatch_statistics():
    stats = mismatch_stats(OLD, ENGINE, MASK)
    d = [math.log(r) for r in (0.4, 1.0, 3.0, 1.5, 1.2, 1.0, 1.0)]
    assert stats["rollout_logprob_diff"] == pytest.approx(sum(map(abs, d)) / 7)
    assert stats["rollout_kl_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 7)


@pytest.mark.parametrize("name", NAMES)
def test_the_loss_weights_each_tokens_policy_gradient_and_logs_the_mismatch(name):
    """On-policy the policy gradient of token t is -A_i / (B |o_i|); the correction multiplies
    it by the token's weight, and the fraction of weights other than 1 is logged."""
    advantages = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    logp = OLD.clone().requires_grad_()
    loss_fn = GRPOLoss(kl={"coef": 0.0}, rollout_correction={"name": name})
    loss, stats = loss_fn(logp, None, None, advantages, MASK, sampling_logprobs=ENGINE)
    loss.backward()
    weights = reference(name, {})
    lengths = MASK.sum(1).tolist()
    for i, row in enumerate(weights):
        expected = [-advantages[i].item() * w / (3 * lengths[i]) for w in row]
        assert logp.grad[i][MASK[i]].tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    changed = sum(w != 1.0 for row in weights for w in row) / 7
    assert stats["rollout_corrected_fraction"] == pytest.approx(changed)
    assert stats["rollout_kl_k3"] > 0


# The trained policy's log-probs: OLD moved by amounts that put some ratios outside the clip.
SHIFT = torch.tensor([[0.5, -0.05, 0.1], [-0.4, 0.15, 0.0], [0.0, 0.3, -0.2]], dtype=torch.float64)
ADVANTAGES = [1.0, -1.0, 0.5]


def token_mean_reference(per_token) -> tuple[float, list[list[float]]]:
    """The token-mean loss of `per_token(i, logp, prox, behav, a)` over valid tokens (python
    floats) and its gradient by central differences, per valid token."""

    def loss(shift: list[list[float]]) -> float:
        total, count = 0.0, 0
        rows = zip(OLD.tolist(), ENGINE.tolist(), MASK.tolist(), shift, strict=True)
        for i, (prox_row, behav_row, valid, delta) in enumerate(rows):
            for prox, behav, v, d in zip(prox_row, behav_row, valid, delta, strict=True):
                if v:
                    total += per_token(prox + d, prox, behav, ADVANTAGES[i])
                    count += 1
        return total / count

    base, h = SHIFT.tolist(), 1e-6
    grads = []
    for i, row in enumerate(base):
        grads.append([])
        for t in range(len(row)):
            if MASK[i, t]:
                up = [r[:] for r in base]
                down = [r[:] for r in base]
                up[i][t] += h
                down[i][t] -= h
                grads[i].append((loss(up) - loss(down)) / (2 * h))
    return loss(base), grads


def clipped_surrogate(ratio: float, a: float, eps: float = 0.2) -> float:
    return -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)


def test_decoupled_ppo_equals_areals_loss():
    """old_logprobs=trainer with the decoupled correction is AReaL's decoupled PPO loss
    (arXiv 2505.24298, eq. 5; AReaL's ppo_actor_loss_fn): the clip against the proximal
    policy (the trainer's log-probs before the update), times w = pi_prox / pi_behav, 0 where
    w > cap; token mean."""
    cap = 2.5

    def areal(logp: float, prox: float, behav: float, a: float) -> float:
        w = math.exp(prox - behav)
        return clipped_surrogate(math.exp(logp - prox), a) * (w if w <= cap else 0.0)

    expected, grads = token_mean_reference(areal)
    logp = (OLD + SHIFT).requires_grad_()
    loss_fn = GRPOLoss(
        kl={"coef": 0.0},
        rollout_correction={"name": "decoupled", "cap": cap},
        aggregation="token_mean",
    )
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    loss, stats = loss_fn(logp, OLD, None, advantages, MASK, sampling_logprobs=ENGINE)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for i, row in enumerate(grads):
        assert logp.grad[i][MASK[i]].tolist() == pytest.approx(row, rel=1e-6, abs=1e-9)
    assert 0 < stats["clip_fraction"] < 1 and 0 < stats["rollout_corrected_fraction"] <= 1


def test_engine_logprobs_as_old_equal_trls_async_loss():
    """old_logprobs=engine: the ratio's denominator is the behaviour policy itself, pi / pi_engine,
    clipped (TRL AsyncGRPO and prime-rl take the inference engine's log-probs as pi_old); no
    correction weight."""

    def trl(logp: float, prox: float, behav: float, a: float) -> float:
        return clipped_surrogate(math.exp(logp - behav), a)

    expected, grads = token_mean_reference(trl)
    logp = (OLD + SHIFT).requires_grad_()
    loss_fn = GRPOLoss(kl={"coef": 0.0}, aggregation="token_mean")
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    loss, stats = loss_fn(logp, ENGINE, None, advantages, MASK)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for i, row in enumerate(grads):
        assert logp.grad[i][MASK[i]].tolist() == pytest.approx(row, rel=1e-6, abs=1e-9)
    assert 0 < stats["clip_fraction"] < 1
