"""The GRPO variants in conf/algorithm/ and the pieces they are made of.

Tested elsewhere, not repeated here: every aggregation, clip-higher, dual clip, KL and entropy
bonus against a float64 loop reference (test_loss.py::test_loss_matches_loop_reference);
Dr. GRPO's per-token gradient independent of completion length while GRPO's is 1/length
(test_loss.py::test_dr_grpo_gradient_is_independent_of_length); the soft overlong punishment
at its buffer's edges (test_rewards.py::test_soft_overlong_punishment).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CONF_DIR, read_metrics
from hydra import compose, initialize_config_dir

from grpo.advantages import beta_weights, group_advantages

ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


def compose_algorithm(name: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"algorithm={name}"])


def step_lines(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "train/optimizer_steps" in m]


def test_every_variant_is_here():
    assert ALGORITHMS == ["bnpo", "dapo", "dr_grpo", "grpo"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_trains_two_steps_from_the_cli(tiny_run, name):
    run_dir, _ = tiny_run(f"algorithm={name}")
    lines = step_lines(run_dir)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["train/total_loss"]) for m in lines)
    assert all(m["train/entropy_mean"] > 0 for m in lines)
    assert ("train/sampling_rounds" in lines[0]) == (name == "dapo")
    assert ("train/kl_mean" in lines[0]) == (name in ("grpo", "dr_grpo", "bnpo"))


def test_variants_change_what_their_papers_change():
    grpo, dr, dapo, bnpo = (compose_algorithm(n) for n in ("grpo", "dr_grpo", "dapo", "bnpo"))
    assert grpo.reward == dr.reward  # the default reward: variants leave it alone
    assert not dr.algorithm.advantage_normalization
    assert dr.algorithm.loss.aggregation == "seq_mean_token_sum_norm"
    assert dr.algorithm.loss.max_completion_length == dr.trainer.max_new_tokens
    assert (dapo.algorithm.loss.clip_ratio_low, dapo.algorithm.loss.clip_ratio_high) == (0.2, 0.28)
    assert dapo.algorithm.loss.aggregation == "token_mean"
    assert dapo.algorithm.loss.kl_coef == 0.0 and dapo.algorithm.dynamic_sampling.enabled
    assert list(dapo.reward.components) == ["correctness", "overlong"]
    assert bnpo.algorithm.advantage_scale == "beta"
    assert bnpo.reward._target_ == "grpo.rewards.CorrectnessReward"
    # Everything else is grpo's.
    for variant, changed in (
        (dr, {"advantage_normalization", "loss"}),
        (dapo, {"kl_coef", "dynamic_sampling", "loss"}),
        (bnpo, {"advantage_scale"}),
    ):
        same = {k for k in grpo.algorithm if variant.algorithm[k] == grpo.algorithm[k]}
        assert set(grpo.algorithm) - same == changed


def test_an_explicit_reward_beats_the_variants_default():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["algorithm=dapo", "reward=correctness"])
    assert cfg.reward._target_ == "grpo.rewards.CorrectnessReward"


def test_pieces_combine_by_override_from_the_cli(tiny_run):
    run_dir, _ = tiny_run(
        "algorithm.update_epochs=2",
        "algorithm.num_mini_batches=2",
        "algorithm.advantage_scale=batch",
        "algorithm.dynamic_sampling.enabled=true",
        "algorithm.dynamic_sampling.max_extra_rounds=1",
        "algorithm.reference_update.every=1",
        "algorithm.reference_update.mix=0.5",
        "algorithm.loss.clip_ratio_high=0.28",
        "algorithm.loss.dual_clip=3.0",
        "algorithm.loss.entropy_coef=0.01",
    )
    lines = step_lines(run_dir)
    assert len(lines) == 2
    for m in lines:
        assert m["train/optimizer_steps"] == 4.0  # 2 epochs x 2 mini-batches
        assert 1 <= m["train/sampling_rounds"] <= 2
        assert m["train/entropy_bonus"] > 0 and "train/dual_clip_fraction" in m


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
def test_bnpo_advantages_match_a_float64_reference(lo_hi):
    lo, hi = lo_hi
    correct = [1, 2, 2, 3, 5, 7]  # of 8 per group: every group mean strictly inside (0, 1)
    binary = torch.tensor([[float(j < c) for j in range(8)] for c in correct], dtype=torch.float64)
    rewards = (lo + (hi - lo) * binary).flatten()
    got = group_advantages(rewards, 8, scale="beta", reward_range=lo_hi)
    expected = torch.tensor(bnpo_reference(rewards.tolist(), 8, lo, hi), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_bnpo_is_grpo_times_a_constant_when_alpha_equals_beta_equals_three_halves():
    # Group means 1/4, 3/4, 1/2: mean 1/2, unbiased variance 1/16, so a = b = 3/2 and
    # alpha = beta = 3/2; then 1/f(p) = B(3/2, 3/2) / sqrt(p (1 - p)) = (pi / 8) / std.
    rewards = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0], dtype=torch.float64)
    bnpo = group_advantages(rewards, 4, scale="beta")
    grpo = group_advantages(rewards, 4, scale="group", eps=1e-12)
    torch.testing.assert_close(bnpo, math.pi / 8 * grpo)


def test_bnpo_edge_cases():
    # One group, or identical group means: uniform density, weight 1 (REINFORCE with baseline).
    assert torch.equal(beta_weights(torch.tensor([0.3])), torch.ones(1, dtype=torch.float64))
    assert torch.equal(beta_weights(torch.tensor([0.5, 0.5])), torch.ones(2, dtype=torch.float64))
    # Groups at p = 0 or 1 have zero density: a capped weight and exactly zero advantages.
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    advantages = group_advantages(rewards, 2, scale="beta")
    assert torch.isfinite(advantages).all() and torch.equal(advantages[:4], torch.zeros(4))
    with pytest.raises(ValueError, match=r"reward 1.5 at row 1 is outside reward_range"):
        group_advantages(torch.tensor([0.0, 1.5]), 2, scale="beta")
