"""Advantage estimators: every registered one (enumerated: a new entry is covered without a
test edit), then each against its paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm.advantages import (
    ADVANTAGE_ESTIMATORS,
    beta_weights,
    estimate_advantages,
    group_reward_spread,
)

NAMES = list(ADVANTAGE_ESTIMATORS)


def rewards_and_parts(seed: int, groups: int = 4, g: int = 4):
    """Rewards in [0, 1] with two parts that sum to them; group 1 has no spread."""
    gen = torch.Generator().manual_seed(seed)
    correct = (torch.rand(groups * g, generator=gen) < 0.5).double()
    form = 0.1 * (torch.rand(groups * g, generator=gen) < 0.5).double()
    correct[g : 2 * g], form[g : 2 * g] = 1.0, 0.0
    return (correct + form) / 1.1, {"correctness": correct / 1.1, "format": form / 1.1}


def estimate(name: str, rewards, g, parts):
    return estimate_advantages({"name": name}, rewards, g, parts)


@pytest.mark.parametrize("name", NAMES)
def test_shape_finite_and_no_signal_from_a_group_without_spread(name):
    rewards, parts = rewards_and_parts(0)
    advantages = estimate(name, rewards, 4, parts)
    assert advantages.shape == rewards.shape and torch.isfinite(advantages).all()
    assert torch.equal(advantages[4:8], torch.zeros(4, dtype=advantages.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_permuting_a_group_permutes_its_advantages(name):
    rewards, parts = rewards_and_parts(1)
    order = torch.tensor([3, 2, 1, 0, 4, 5, 6, 7, 9, 8, 11, 10, 12, 13, 15, 14])
    moved = estimate(name, rewards[order], 4, {k: v[order] for k, v in parts.items()})
    torch.testing.assert_close(moved, estimate(name, rewards, 4, parts)[order])


@pytest.mark.parametrize("name", NAMES)
def test_bad_rewards_name_the_row_and_group(name):
    rewards, parts = rewards_and_parts(2)
    rewards[6] = math.nan
    with pytest.raises(ValueError, match=r"row 6 \(group 1\)"):
        estimate(name, rewards, 4, parts)
    with pytest.raises(ValueError, match="multiple of group_size"):
        estimate(name, rewards[:7], 4, {k: v[:7] for k, v in parts.items()})


def test_an_unknown_estimator_or_setting_lists_the_registered_ones():
    """The check the config runs once before loading (grpo.run.config)."""
    key = "algorithm.advantage.name"
    with pytest.raises(ValueError, match="registered: .*grpo"):
        ADVANTAGE_ESTIMATORS.check("gae", {}, key)
    with pytest.raises(ValueError, match="not a setting of advantage estimator 'no_std'"):
        ADVANTAGE_ESTIMATORS.check("no_std", {"eps": 1.0}, key)


def test_grpo_matches_hand_computation():
    # Group 0: one correct of four, mean 0.25, population std sqrt(0.25 * 0.75).
    # Group 1: two correct of four, mean 0.5, population std 0.5.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    eps, std0 = 1e-4, math.sqrt(0.25 * 0.75)
    expected = [0.75 / (std0 + eps)] + [-0.25 / (std0 + eps)] * 3
    expected += [0.5 / (0.5 + eps)] * 2 + [-0.5 / (0.5 + eps)] * 2
    got = estimate_advantages({"name": "grpo", "eps": eps}, rewards, 4)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_grpo_advantages_have_unit_population_variance(group_size):
    rewards = torch.randn(5 * group_size, generator=torch.Generator().manual_seed(group_size))
    advantages = estimate_advantages({"name": "grpo", "eps": 1e-8}, rewards, group_size)
    advantages = advantages.view(-1, group_size)
    torch.testing.assert_close(advantages.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(advantages.std(1, correction=0), torch.ones(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name", ["grpo", "batch_std", "no_std", "rloo", "reinforce_pp_baseline", "gdpo"]
)
def test_identical_rewards_give_exact_zeros(name):
    # 0.1 repeated eight times: its float32 mean is one ulp away from 0.1, so a naive
    # (r - mean) / (std + eps) would give advantages of about 7e-5 instead of 0.
    rewards = torch.tensor([0.1] * 8 + [1.0, 0.0] * 4)
    advantages = estimate(name, rewards, 8, {})
    assert torch.equal(advantages[:8], torch.zeros(8))
    assert (advantages[8:] != 0).all()


def test_batch_std_divides_by_the_std_of_all_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    eps = 1e-4
    batch = math.sqrt(sum((r - 1.125) ** 2 for r in rewards.tolist()) / 8)
    centred = [0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0]
    got = estimate_advantages({"name": "batch_std", "eps": eps}, rewards, 4)
    torch.testing.assert_close(got, torch.tensor([c / (batch + eps) for c in centred]))


def test_no_std_only_centres_and_takes_integer_rewards():
    got = estimate("no_std", torch.tensor([1, 0, 1, 1]), 2, {})
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_reward_spread():
    rewards = torch.tensor([0.1] * 4 + [1.0, 0.0, 0.0, 0.0] + [2.0, 0.0, 2.0, 0.0])
    spread = group_reward_spread(rewards, group_size=4)
    assert spread[0].item() == 0.0
    torch.testing.assert_close(spread[1:], torch.tensor([math.sqrt(0.1875), 1.0]))


def bnpo_reference(rewards: list[float], group_size: int, lo: float, hi: float) -> list[float]:
    """BNPO's advantage, written out with python floats (the authors' code, in loops)."""
    scaled = [(r - lo) / (hi - lo) for r in rewards]
    groups = [scaled[i : i + group_size] for i in range(0, len(scaled), group_size)]
    p = [sum(g) / group_size for g in groups]
    mean = sum(p) / len(p)
    var = sum((x - mean) ** 2 for x in p) / (len(p) - 1)
    common = mean * (1 - mean) / var - 1
    alpha, beta = max(1.0, 1 + common * mean / 3), max(1.0, 1 + common * (1 - mean) / 3)
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    out = []
    for g, pk in zip(groups, p, strict=True):
        density = math.exp((alpha - 1) * math.log(pk) + (beta - 1) * math.log(1 - pk) - log_b)
        out += [(r - pk) / density for r in g]
    return out


@pytest.mark.parametrize("lo_hi", [(0.0, 1.0), (-1.0, 2.0)])
def test_bnpo_matches_a_float64_reference(lo_hi):
    lo, hi = lo_hi
    correct = [1, 2, 2, 3, 5, 7]  # of 8 per group: every group mean strictly inside (0, 1)
    binary = torch.tensor([[float(j < c) for j in range(8)] for c in correct], dtype=torch.float64)
    rewards = (lo + (hi - lo) * binary).flatten()
    got = estimate_advantages({"name": "bnpo", "reward_range": lo_hi}, rewards, 8)
    expected = torch.tensor(bnpo_reference(rewards.tolist(), 8, lo, hi), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_bnpo_is_grpo_times_a_constant_when_alpha_equals_beta_equals_three_halves():
    # Group means 1/4, 3/4, 1/2: mean 1/2, unbiased variance 1/16, so a = b = 3/2 and
    # alpha = beta = 3/2; then 1/f(p) = B(3/2, 3/2) / sqrt(p (1 - p)) = (pi / 8) / std.
    rewards = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.float64)
    bnpo = estimate("bnpo", rewards, 4, {})
    grpo = estimate_advantages({"name": "grpo", "eps": 1e-12}, rewards, 4)
    torch.testing.assert_close(bnpo, math.pi / 8 * grpo)


def test_bnpo_edge_cases():
    # One group, or identical group means: uniform density, weight 1 (REINFORCE with baseline).
    assert torch.equal(beta_weights(torch.tensor([0.3])), torch.ones(1, dtype=torch.float64))
    assert torch.equal(beta_weights(torch.tensor([0.5, 0.5])), torch.ones(2, dtype=torch.float64))
    # Groups at p = 0 or 1 have zero density: a capped weight and exactly zero advantages.
    advantages = estimate("bnpo", torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 2, {})
    assert torch.isfinite(advantages).all() and torch.equal(advantages[:4], torch.zeros(4))
    with pytest.raises(ValueError, match=r"reward 1.5 at row 1 is outside reward_range"):
        estimate("bnpo", torch.tensor([0.0, 1.5]), 2, {})


# ------------------------------------------------------------------ references, written out
def groups_of(rewards, g: int) -> list[list[float]]:
    values = rewards.tolist()
    return [values[i : i + g] for i in range(0, len(values), g)]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def pstd(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def float64_rewards(seed: int, groups: int = 5, g: int = 4):
    """Continuous rewards with two parts; group 1 constant in both parts, group 2 constant in its
    total only, group 3 with a tie for its best."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(groups * g, generator=gen, dtype=torch.float64)
    b = 0.3 * torch.rand(groups * g, generator=gen, dtype=torch.float64)
    a[g : 2 * g], b[g : 2 * g] = 0.5, 0.1
    a[2 * g : 3 * g] = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    b[2 * g : 3 * g] = 1.0 - a[2 * g : 3 * g]
    a[3 * g : 4 * g] = torch.tensor([0.9, 0.1, 0.9, 0.3], dtype=torch.float64)
    b[3 * g : 4 * g] = 0.0
    return a + b, {"a": a, "b": b}


def rloo_reference(rewards, g: int) -> list[float]:
    """RLOO (arXiv 2402.14740): r_i minus the mean of the other G-1 rewards of its group."""
    out = []
    for group in groups_of(rewards, g):
        out += [
            r - sum(group[j] for j in range(g) if j != i) / (g - 1) for i, r in enumerate(group)
        ]
    return out


def test_rloo_matches_a_float64_reference_and_is_a_rescaled_no_std():
    rewards, parts = float64_rewards(20)
    got = estimate("rloo", rewards, 4, parts)
    expected = torch.tensor(rloo_reference(rewards, 4), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for g in (2, 4, 5):  # A_i = G/(G-1) (r_i - mean(group))
        r = torch.randn(3 * g, generator=torch.Generator().manual_seed(g), dtype=torch.float64)
        no_std = estimate("no_std", r, g, {})
        torch.testing.assert_close(estimate("rloo", r, g, {}), g / (g - 1) * no_std)


def reinforce_pp_reference(rewards, g: int, eps: float) -> list[float]:
    """REINFORCE++-baseline (arXiv 2501.03262): group mean out, then batch whitening; 0 for a
    group whose rewards agree."""
    groups = groups_of(rewards, g)
    x = [r - mean(group) for group in groups for r in group]
    m, s = mean(x), pstd(x)
    constant = [max(group) == min(group) for group in groups]
    return [0.0 if constant[i // g] else (v - m) / (s + eps) for i, v in enumerate(x)]


def test_reinforce_pp_baseline_matches_a_float64_reference():
    rewards, parts = float64_rewards(21)
    got = estimate_advantages({"name": "reinforce_pp_baseline", "eps": 1e-4}, rewards, 4, parts)
    expected = torch.tensor(reinforce_pp_reference(rewards, 4, 1e-4), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # Whitened over the batch: mean 0, std 1 (up to eps); unlike batch_std, whose scale is the
    # std of the raw rewards (it counts the spread of the group means too).
    tiny = estimate_advantages({"name": "reinforce_pp_baseline", "eps": 1e-12}, rewards, 4, {})
    assert tiny.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert tiny.std(correction=0).item() == pytest.approx(1.0, rel=1e-9)
    batch = estimate_advantages({"name": "batch_std", "eps": 1e-12}, rewards, 4)
    assert batch.std(correction=0).item() < 0.99


def passk_reference(rewards, g: int, divide_by_std: bool, eps: float) -> list[float]:
    """verl's grpo_passk: r_max - r_second_max for the best of each group, 0 for the others."""
    out = []
    for group in groups_of(rewards, g):
        ranked = sorted(group, reverse=True)
        gap = ranked[0] - ranked[1]
        if divide_by_std:
            gap /= pstd(group) + eps
        best = group.index(ranked[0])
        out += [gap if i == best else 0.0 for i in range(g)]
    return out


@pytest.mark.parametrize("divide_by_std", [True, False])
def test_grpo_passk_matches_a_float64_reference(divide_by_std):
    rewards, parts = float64_rewards(22)
    settings = {"name": "grpo_passk", "divide_by_std": divide_by_std, "eps": 1e-4}
    got = estimate_advantages(settings, rewards, 4, parts)
    expected = passk_reference(rewards, 4, divide_by_std, 1e-4)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (got != 0).sum() == 2  # one per group, none in the two constant ones and the tied one
    assert torch.equal(got[12:16], torch.zeros(4, dtype=torch.float64))  # a tie for the best


def test_grpo_passk_credits_only_the_best_by_its_margin():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.2, 0.9, 0.5, 0.5])
    got = estimate_advantages({"name": "grpo_passk", "divide_by_std": False}, rewards, 4)
    torch.testing.assert_close(got, torch.tensor([1.0] + [0.0] * 8 + [0.4, 0.0, 0.0]))


def gdpo_reference(parts: dict, rewards, g: int, weights: dict, batch: bool, eps: float):
    """GDPO (arXiv 2601.05242): per-part group normalisation, weighted sum, batch whitening;
    ours: zeros for a group whose total rewards agree."""
    n = len(rewards)
    summed = [0.0] * n
    for name, part in parts.items():
        for k, group in enumerate(groups_of(part, g)):
            m, s = mean(group), pstd(group)
            for j, r in enumerate(group):
                summed[k * g + j] += weights.get(name, 1.0) * (
                    0.0 if s == 0 else (r - m) / (s + eps)
                )
    if batch:
        m, s = mean(summed), pstd(summed)
        summed = [(v - m) / (s + eps) for v in summed]
    totals = groups_of(rewards, g)
    return [0.0 if max(totals[i // g]) == min(totals[i // g]) else v for i, v in enumerate(summed)]


@pytest.mark.parametrize("batch_normalize", [True, False])
@pytest.mark.parametrize("weights", [None, {"b": 3.0}])
def test_gdpo_matches_a_float64_reference(batch_normalize, weights):
    rewards, parts = float64_rewards(23)
    parts["c"] = torch.zeros_like(rewards)  # a part constant everywhere adds nothing
    settings = {"name": "gdpo", "part_weights": weights, "batch_normalize": batch_normalize}
    got = estimate_advantages(settings, rewards, 4, parts)
    expected = gdpo_reference(parts, rewards, 4, weights or {}, batch_normalize, 1e-4)
    torch.testing.assert_close(
        got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14
    )
    assert torch.equal(got[4:12], torch.zeros(8, dtype=torch.float64))  # totals agree


def test_gdpo_with_one_part_is_group_normalisation():
    rewards, _ = float64_rewards(24)
    one = {"correctness": rewards}
    grpo = estimate_advantages({"name": "grpo"}, rewards, 4)
    plain = estimate_advantages({"name": "gdpo", "batch_normalize": False}, rewards, 4, one)
    torch.testing.assert_close(plain, grpo, rtol=1e-15, atol=0)
    whitened = estimate_advantages({"name": "gdpo"}, rewards, 4, one)
    torch.testing.assert_close(whitened, (grpo - grpo.mean()) / (grpo.std(correction=0) + 1e-4))
    # Without parts the reward is the one part.
    torch.testing.assert_close(estimate_advantages({"name": "gdpo"}, rewards, 4), whitened)


def test_gdpo_keeps_apart_reward_combinations_that_grpo_merges():
    """The paper's point: totals (1 + 0) and (0 + 1) get one advantage from grpo, but their parts
    differ in spread, so gdpo tells them apart; and scaling a part changes nothing."""
    a = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    grpo = estimate_advantages({"name": "grpo"}, a + b, 4)
    gdpo = estimate_advantages({"name": "gdpo", "eps": 1e-12}, a + b, 4, {"a": a, "b": b})
    assert grpo[0] == grpo[1] == grpo[2]
    assert gdpo[0] > gdpo[1] == gdpo[2] > gdpo[3]
    scaled = estimate_advantages({"name": "gdpo", "eps": 1e-12}, 5 * a + b, 4, {"a": 5 * a, "b": b})
    torch.testing.assert_close(scaled, gdpo)


def test_gdpo_refuses_unknown_weights_and_parts_that_miss_the_reward():
    rewards, parts = float64_rewards(25)
    with pytest.raises(ValueError, match="part_weights names z: not a part of the reward"):
        estimate_advantages({"name": "gdpo", "part_weights": {"z": 1.0}}, rewards, 4, parts)
    with pytest.raises(ValueError, match=r"do not add up to the reward at row 3.*kl.in_reward"):
        estimate_advantages({"name": "gdpo"}, rewards - 0.01 * (torch.arange(20) == 3), 4, parts)
