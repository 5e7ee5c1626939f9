"""KL estimators: every registered one (enumerated), then each against Schulman's note.

With tokens sampled from pi, k1 and k3 are unbiased estimates of KL(pi || pi_ref) (Schulman,
"Approximating KL divergence", 2020); k3_is stays unbiased when the tokens came from another
policy pi_old (DeepSeek-V3.2). These are checked by sampling a categorical distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm.kl import KL_ESTIMATORS, sequence_kl_penalty

NAMES = list(KL_ESTIMATORS)


def logps(seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logp = -4 * torch.rand(n, generator=gen, dtype=torch.float64)
    return logp, logp + torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_zero_where_the_policy_is_the_reference(name):
    logp, _ = logps(0)
    assert torch.equal(
        KL_ESTIMATORS[name](logp, logp.clone(), logp.clone()), torch.zeros_like(logp)
    )


@pytest.mark.parametrize("name", NAMES)
def test_elementwise_finite_with_a_gradient(name):
    logp, ref = logps(1)
    logp.requires_grad_()
    kl = KL_ESTIMATORS[name](logp, ref, logp.detach())
    assert kl.shape == logp.shape and torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_each_estimator_matches_its_formula():
    logp, ref = logps(2, n=50)
    old = logp + 0.1
    for i in range(50):
        lp, rf, od = logp[i].item(), ref[i].item(), old[i].item()
        d = rf - lp
        expected = {
            "k1": -d,
            "k2": d * d / 2,
            "k3": math.exp(d) - d - 1,
            "low_var_kl": min(
                max(math.exp(max(min(d, 20), -20)) - max(min(d, 20), -20) - 1, -10), 10
            ),
            "k3_is": math.exp(lp - od) * (math.exp(d) - d - 1),
        }
        for name, value in expected.items():
            got = KL_ESTIMATORS[name](logp[i : i + 1], ref[i : i + 1], old[i : i + 1]).item()
            assert got == pytest.approx(value, rel=1e-12, abs=1e-15), name


def test_k3_stays_nonnegative_for_tiny_float32_log_ratios():
    tiny = torch.logspace(-9, -3, 50)
    zeros = torch.zeros(50)
    assert (KL_ESTIMATORS["k3"](zeros, tiny, zeros) >= 0).all()
    assert (KL_ESTIMATORS["k3"](zeros, -tiny, zeros) >= 0).all()


def categorical(seed: int, v: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.log_softmax(torch.randn(v, generator=gen, dtype=torch.float64), 0) for _ in range(3)
    )


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_true_kl(name):
    pi, ref, _ = categorical(3)
    exact = (pi.exp() * (pi - ref)).sum().item()
    # The expectation over tokens drawn from pi, computed exactly by weighting every token.
    mean = (pi.exp() * KL_ESTIMATORS[name](pi, ref, pi)).sum().item()
    assert mean == pytest.approx(exact, rel=1e-12)


def test_importance_weighted_k3_is_unbiased_from_another_sampling_policy():
    pi, ref, old = categorical(4)
    exact = (pi.exp() * (pi - ref)).sum().item()
    from_old = (old.exp() * KL_ESTIMATORS["k3_is"](pi, ref, old)).sum().item()
    plain_k3_from_old = (old.exp() * KL_ESTIMATORS["k3"](pi, ref, old)).sum().item()
    assert from_old == pytest.approx(exact, rel=1e-12)
    assert abs(plain_k3_from_old - exact) > 1e-3  # without the weight it is biased


def test_sequence_penalty_sums_valid_tokens_times_beta():
    logp, ref = logps(5, n=12)
    logp, ref = logp.view(3, 4), ref.view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    penalty = sequence_kl_penalty("k1", logp, ref, mask, coef=0.5)
    expected = 0.5 * torch.where(mask, logp - ref, 0.0).sum(1)
    torch.testing.assert_close(penalty, expected)
    assert penalty[2] == 0


def test_importance_weighted_k3_has_the_gradient_of_the_kl_only_with_the_weight_attached():
    """DeepSeek-V3.2's weight pi / pi_old carries gradient (as TRL's `use_bias_correction_kl`,
    whose ratio is not detached): the expected gradient over tokens from pi_old is then exactly
    the gradient of KL(pi || pi_ref). With the weight detached it would be the gradient of the
    reverse KL(pi_ref || pi) instead (k3's known pathwise gradient)."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    old = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    pi = torch.log_softmax(logits, 0)

    def grad(value: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(value, logits, retain_graph=True)[0]

    kl = grad((pi.exp() * (pi - ref)).sum())
    reverse = grad((ref.exp() * (ref - pi)).sum())
    expected = grad((old.exp() * KL_ESTIMATORS["k3_is"](pi, ref, old)).sum())
    detached = torch.exp(pi - old).detach() * KL_ESTIMATORS["k3"](pi, ref, old)
    torch.testing.assert_close(expected, kl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad((old.exp() * detached).sum()), reverse, rtol=1e-12, atol=1e-14)
    assert (kl - reverse).abs().max() > 1e-3
