import math

import pytest
import torch

from grpo.advantages import group_advantages, group_reward_spread


def test_group_advantages_match_hand_computation():
    # Group 0: one correct of four, mean 0.25, population std sqrt(0.25 * 0.75).
    # Group 1: two correct of four, mean 0.5, population std 0.5.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    eps = 1e-4
    std0 = math.sqrt(0.25 * 0.75)
    expected = [
        0.75 / (std0 + eps),
        -0.25 / (std0 + eps),
        -0.25 / (std0 + eps),
        -0.25 / (std0 + eps),
        0.5 / (0.5 + eps),
        0.5 / (0.5 + eps),
        -0.5 / (0.5 + eps),
        -0.5 / (0.5 + eps),
    ]
    advantages = group_advantages(rewards, group_size=4, eps=eps)
    assert advantages.shape == (8,)
    torch.testing.assert_close(advantages, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_scaled_advantages_have_unit_population_variance(group_size):
    rewards = torch.randn(5 * group_size, generator=torch.Generator().manual_seed(group_size))
    advantages = group_advantages(rewards, group_size, eps=1e-8).view(-1, group_size)
    std = advantages.std(dim=1, correction=0)
    torch.testing.assert_close(advantages.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(5), atol=1e-5, rtol=0)


def test_two_completions_get_plus_minus_one():
    advantages = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=1e-8)
    torch.testing.assert_close(advantages, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_spread_group_gets_exact_zeros(scale):
    # 0.1 repeated eight times: its float32 mean is one ulp away from 0.1, so a naive
    # (r - mean) / (std + eps) would give advantages of about 7e-5 instead of 0.
    rewards = torch.tensor([0.1] * 8 + [1.0, 0.0] * 4)
    advantages = group_advantages(rewards, group_size=8, scale=scale)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:8], torch.zeros(8))
    assert (advantages[8:] != 0).all()


def test_all_groups_zero_spread_gives_zeros_not_nan():
    advantages = group_advantages(torch.ones(6), group_size=3, scale="batch")
    assert torch.equal(advantages, torch.zeros(6))


def test_batch_scale_divides_by_std_of_all_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    eps = 1e-4
    batch_std = math.sqrt(sum((r - 1.125) ** 2 for r in rewards.tolist()) / 8)
    centred = [0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0]
    expected = torch.tensor([c / (batch_std + eps) for c in centred])
    advantages = group_advantages(rewards, group_size=4, scale="batch", eps=eps)
    torch.testing.assert_close(advantages, expected, rtol=1e-6, atol=1e-6)


def test_none_scale_only_centres():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    advantages = group_advantages(rewards, group_size=4, scale="none")
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)


def test_integer_rewards_are_accepted():
    advantages = group_advantages(torch.tensor([1, 0, 1, 1]), group_size=2, scale="none")
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_reward_spread():
    rewards = torch.tensor([0.1] * 4 + [1.0, 0.0, 0.0, 0.0] + [2.0, 0.0, 2.0, 0.0])
    spread = group_reward_spread(rewards, group_size=4)
    assert spread.shape == (3,)
    assert spread[0].item() == 0.0
    torch.testing.assert_close(spread[1:], torch.tensor([math.sqrt(0.1875), 1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_names_row_and_group(bad):
    rewards = torch.zeros(8)
    rewards[6] = bad
    with pytest.raises(ValueError, match=r"row 6 \(group 1\)"):
        group_advantages(rewards, group_size=4)
    with pytest.raises(ValueError, match=r"row 6 \(group 1\)"):
        group_reward_spread(rewards, group_size=4)


@pytest.mark.parametrize("group_size", [0, 1])
def test_group_size_below_two_raises(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=group_size)


def test_incomplete_group_raises():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), group_size=4)


def test_bad_scale_eps_and_shape_raise():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), group_size=2, eps=0.0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)
