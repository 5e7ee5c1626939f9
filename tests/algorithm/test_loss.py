"""GRPOLoss: the policy loss, the KL, the entropy bonus and every aggregation against a loop
reference over python floats (DeepSeekMath eq. 3/4), micro-batch additivity, token selection."""

import math

import pytest
import torch
from conftest import compose_config

from grpo.algorithm.loss import AGGREGATIONS, GRPOLoss
from grpo.algorithm.policy_losses import POLICY_LOSSES
from grpo.algorithm.rollout_correction import ROLLOUT_CORRECTIONS
from grpo.run.config import ConfigError, validate_config

MAX_LEN = 7


def random_batch(seed: int, batch: int = 6, length: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """Float64 inputs with ragged masks (rows 0 and 3 have a single token) and junk padding."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = lengths[3] = 1
    lengths[1] = length
    # Log-ratios of spread 0.8 clip many tokens; token (1, 0) has ratio e^1.5 > 3 and A < 0,
    # so the dual clip c = 3 is active somewhere.
    old_logprobs = logprobs + 0.8 * torch.randn(batch, length, generator=gen)
    old_logprobs[1, 0] = logprobs[1, 0] - 1.5
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    advantages[1] = -advantages[1].abs()
    return {
        "logprobs": logprobs,
        "old_logprobs": old_logprobs,
        "ref_logprobs": logprobs + 0.3 * torch.randn(batch, length, generator=gen),
        "advantages": advantages,
        "mask": torch.arange(length) < lengths.unsqueeze(1),
        "entropy": 2 * torch.rand(batch, length, generator=gen, dtype=torch.float64),
    }


def reference_loss(
    inputs: dict[str, torch.Tensor],
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    beta: float,
    entropy_coef: float,
    aggregation: str,
) -> tuple[float, float]:
    """DeepSeekMath eq. 3/4 with explicit loops over python floats: (loss, clip fraction)."""
    logp, old, ref, ent, mask = (
        inputs[k].tolist() for k in ("logprobs", "old_logprobs", "ref_logprobs", "entropy", "mask")
    )
    advantages = inputs["advantages"].tolist()
    sequence_sums, sequence_lengths, clipped = [], [], 0
    for i, a in enumerate(advantages):
        total, n = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped_ratio = min(max(ratio, 1 - clip_low), 1 + clip_high)
            surrogate = min(ratio * a, clipped_ratio * a)
            clipped += clipped_ratio * a < ratio * a
            if dual_clip is not None and a < 0:
                surrogate = max(surrogate, dual_clip * a)
            d = ref[i][t] - logp[i][t]
            kl = math.exp(d) - d - 1
            total += -(surrogate - beta * kl) - entropy_coef * ent[i][t]
            n += 1
        sequence_sums.append(total)
        sequence_lengths.append(n)
    num_sequences, num_tokens = len(advantages), sum(sequence_lengths)
    if aggregation == "seq_mean_token_mean":
        per_sequence = [s / n for s, n in zip(sequence_sums, sequence_lengths, strict=True)]
        loss = sum(per_sequence) / num_sequences
    elif aggregation == "token_mean":
        loss = sum(sequence_sums) / num_tokens
    else:
        loss = sum(s / MAX_LEN for s in sequence_sums) / num_sequences
    return loss, clipped / num_tokens


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_loop_reference(aggregation, dual_clip, seed):
    inputs = random_batch(seed)
    hyper = {"clip_low": 0.2, "clip_high": 0.28, "beta": 0.04, "entropy_coef": 0.01}
    loss_fn = GRPOLoss(
        {"name": "clip", "clip_ratio": 0.2, "clip_ratio_high": 0.28, "dual_clip": dual_clip},
        kl={"coef": hyper["beta"]},
        entropy_coef=hyper["entropy_coef"],
        aggregation=aggregation,
        max_completion_length=MAX_LEN,
    )
    loss, stats = loss_fn(**inputs)
    expected, clip_fraction = reference_loss(
        inputs, dual_clip=dual_clip, aggregation=aggregation, **hyper
    )
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) < 1e-6
    assert abs(stats["total_loss"] - expected) < 1e-6
    assert abs(stats["clip_fraction"] - clip_fraction) < 1e-12
    assert stats["clip_fraction"] > 0
    if dual_clip is not None:
        assert stats["dual_clip_fraction"] > 0
    recombined = stats["policy_loss"] + stats["kl_penalty"] - stats["entropy_bonus"]
    assert abs(recombined - stats["total_loss"]) < 1e-12
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_gradcheck_wrt_logprobs(aggregation):
    inputs = random_batch(seed=3, batch=4, length=4)
    logprobs = inputs.pop("logprobs").requires_grad_()
    loss_fn = GRPOLoss(
        {"name": "clip", "clip_ratio_high": 0.28, "dual_clip": 3.0},
        kl={"coef": 0.1},
        entropy_coef=0.01,
        aggregation=aggregation,
        max_completion_length=4,
    )
    assert torch.autograd.gradcheck(lambda lp: loss_fn(lp, **inputs)[0], (logprobs,))


def test_on_policy_loss_is_minus_mean_advantage_with_nonzero_gradient():
    inputs = random_batch(seed=4)
    logprobs = inputs["logprobs"].requires_grad_()
    advantages, mask = inputs["advantages"], inputs["mask"]
    loss, stats = GRPOLoss(kl={"coef": 0.0})(logprobs, None, None, advantages, mask)
    assert abs(loss.item() + advantages.mean().item()) < 1e-12
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
    loss.backward()
    # d/dlogp of -(1/B) sum_i (1/|o_i|) sum_t r A_i with r = 1 is -A_i / (B |o_i|).
    lengths = mask.sum(1, keepdim=True)
    expected = torch.where(mask, -advantages.unsqueeze(1) / (len(advantages) * lengths), 0.0)
    torch.testing.assert_close(logprobs.grad, expected)
    assert logprobs.grad.abs().sum() > 0


def test_kl_terms_vanish_at_the_reference():
    inputs = random_batch(seed=5)
    inputs["ref_logprobs"] = inputs["logprobs"].clone()
    _, stats = GRPOLoss(entropy_coef=0.01)(**inputs)
    assert stats["kl_penalty"] == stats["kl_mean"] == stats["kl_std"] == 0.0


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_micro_batches_sum_to_full_batch(aggregation):
    inputs = random_batch(seed=6)
    loss_fn = GRPOLoss(
        {"name": "clip", "dual_clip": 3.0},
        entropy_coef=0.01,
        aggregation=aggregation,
        max_completion_length=MAX_LEN,
    )
    logprobs = inputs.pop("logprobs").requires_grad_()
    full, _ = loss_fn(logprobs, **inputs)
    (full_grad,) = torch.autograd.grad(full, logprobs)

    totals = {"num_sequences": 6, "num_tokens": int(inputs["mask"].sum())}
    micro_losses = []
    for rows in (slice(0, 2), slice(2, 6)):
        micro = {k: v[rows] for k, v in inputs.items()}
        loss, stats = loss_fn(logprobs[rows], **micro, **totals)
        assert stats["total_loss"] == loss.item()
        micro_losses.append(loss)
    accumulated = sum(micro_losses)
    (accumulated_grad,) = torch.autograd.grad(accumulated, logprobs)
    torch.testing.assert_close(accumulated, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(accumulated_grad, full_grad, rtol=0, atol=1e-12)


def test_dr_grpo_gradient_is_independent_of_length():
    # Two completions with the same advantage, of 2 and 8 tokens, on-policy, no KL.
    logprobs = torch.full((2, 8), -1.0, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(8) < torch.tensor([[2], [8]])
    advantages = torch.tensor([1.0, 1.0], dtype=torch.float64)

    def first_token_grads(aggregation):
        loss_fn = GRPOLoss(kl={"coef": 0.0}, aggregation=aggregation, max_completion_length=8)
        (grad,) = torch.autograd.grad(loss_fn(logprobs, None, None, advantages, mask)[0], logprobs)
        return grad[:, 0]

    short, long = first_token_grads("seq_mean_token_sum_norm")
    assert short == long == -1.0 / (2 * 8)
    short, long = first_token_grads("seq_mean_token_mean")
    assert short == -1.0 / (2 * 2) and long == -1.0 / (2 * 8)  # 1/length: short tokens weigh 4x


# GRPOLoss trusts its settings: grpo.run.config.validate_config refuses bad ones before any
# model loads, naming the key. Ranges, registry names and the KL/entropy/selection settings are
# covered by tests/run/test_config.py; these are the entries' own settings the loss takes.
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.policy_loss.clip_ratio=0.0"], "clip_ratio=0.0: must be in (0, 1)"),
        (["algorithm.policy_loss.clip_ratio=1.0"], "clip_ratio=1.0: must be in (0, 1)"),
        (["algorithm.policy_loss.clip_ratio_high=0.0"], "clip_ratio_high=0.0: must be in (0, inf)"),
        (["algorithm.policy_loss.dual_clip=1.0"], "dual_clip=1.0: must be in (1, inf)"),
        (["+algorithm.policy_loss.eps=0.1"], "eps: not a setting of policy loss 'clip'"),
        (
            ["algorithm/rollout_correction=token_mask", "algorithm.rollout_correction.low=0.0"],
            "algorithm.rollout_correction.low=0.0: must be in (0, inf)",
        ),
    ],
)
def test_the_config_check_refuses_the_settings_the_loss_trusts(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(*overrides))
    key = overrides[-1].lstrip("+").split("=")[0]
    assert str(error.value).startswith(key) and message in str(error.value)


def test_seq_mean_token_sum_norm_needs_the_generation_budget():
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLoss(aggregation="seq_mean_token_sum_norm")(**random_batch(seed=7))


def test_invalid_inputs_name_the_argument():
    inputs = random_batch(seed=7)
    with pytest.raises(ValueError, match="ref_logprobs"):
        GRPOLoss(kl={"coef": 0.04})(**{**inputs, "ref_logprobs": None})
    with pytest.raises(ValueError, match="entropy"):
        GRPOLoss(entropy_coef=0.01)(**{**inputs, "entropy": None})
    with pytest.raises(ValueError, match="selected"):
        GRPOLoss(top_entropy_quantile=0.2)(**inputs)
    with pytest.raises(ValueError, match="advantages"):
        GRPOLoss()(**{**inputs, "advantages": inputs["advantages"][:3]})
    with pytest.raises(ValueError, match="mask"):
        GRPOLoss()(**{**inputs, "mask": inputs["mask"][:, :3]})


def test_selected_tokens_alone_get_policy_gradient_and_the_kl_stays_on_all():
    inputs = random_batch(seed=8)
    logprobs = inputs.pop("logprobs").requires_grad_()
    selected = inputs["mask"] & (inputs["entropy"] > 1.0)
    loss_fn = GRPOLoss(kl={"coef": 0.0}, top_entropy_quantile=0.5)
    loss, stats = loss_fn(logprobs, **inputs, selected=selected)
    loss.backward()
    assert (logprobs.grad[inputs["mask"] & ~selected] == 0).all()
    assert (logprobs.grad[selected] != 0).any()
    masked = (~selected[inputs["mask"]]).double().mean().item()
    assert stats["masked_fraction"] == pytest.approx(masked)
    with_kl = GRPOLoss(kl={"coef": 0.1}, top_entropy_quantile=0.5)
    logprobs.grad = None
    with_kl(logprobs, **inputs, selected=selected)[0].backward()
    assert (logprobs.grad[inputs["mask"] & ~selected] != 0).all()  # the KL term has gradient


def test_off_policy_mask_drops_negative_completions_that_drifted():
    """DeepSeek-V3.2: M_i = 0 when A_i < 0 and mean_t log(pi_old / pi) > delta."""
    inputs = random_batch(seed=9)
    logprobs, mask, old = inputs["logprobs"], inputs["mask"], inputs["old_logprobs"]
    drift = (torch.where(mask, old - logprobs, 0.0).sum(1) / mask.sum(1)).tolist()
    advantages = inputs["advantages"].tolist()
    negative = sorted(d for a, d in zip(advantages, drift, strict=True) if a < 0)
    delta = (negative[0] + negative[-1]) / 2
    dropped = [a < 0 and d > delta for a, d in zip(advantages, drift, strict=True)]
    assert any(dropped) and not all(dropped)
    logprobs = logprobs.clone().requires_grad_()
    loss_fn = GRPOLoss(kl={"coef": 0.0}, off_policy_mask_threshold=delta)
    loss_fn(logprobs, **{k: v for k, v in inputs.items() if k != "logprobs"})[0].backward()
    for row, drop in enumerate(dropped):
        grad = logprobs.grad[row][mask[row]]
        assert (grad == 0).all() if drop else (grad != 0).any()


def compacted(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's values at `mask` moved to its front, the rest zero (right padding)."""
    out = torch.zeros_like(values)
    for row in range(len(values)):
        kept = values[row][mask[row]]
        out[row, : len(kept)] = kept
    return out


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("policy_loss", list(POLICY_LOSSES))
def test_tokens_outside_the_mask_are_padding_wherever_they_are(policy_loss, aggregation):
    """A trajectory's environment tokens are holes in the mask between the model's tokens: junk
    there changes nothing and gets no gradient, and the loss, its gradient on the model's tokens
    and its statistics are those of the same tokens packed to the front, the rest padding, for
    every policy loss, aggregation and rollout correction."""
    inputs = random_batch(seed=11)
    gen = torch.Generator().manual_seed(12)
    shape = inputs["mask"].shape
    holes = torch.rand(shape, generator=gen) < 0.3
    holes[:, 0] = False  # every row keeps a model token
    mask = inputs["mask"] & ~holes
    inputs["sampling_logprobs"] = inputs["old_logprobs"] + 0.2 * torch.randn(shape, generator=gen)
    per_token = [k for k in inputs if k not in ("mask", "advantages")]
    for correction in ROLLOUT_CORRECTIONS:
        loss_fn = GRPOLoss(
            policy_loss={"name": policy_loss},
            kl={"coef": 0.1},
            rollout_correction={"name": correction},
            aggregation=aggregation,
            entropy_coef=0.01,
            max_completion_length=MAX_LEN,
        )
        results = []
        for junk in (1.0, -5.0):
            given = {k: torch.where(mask, inputs[k], junk) for k in per_token}
            results.append(_loss_and_grad(loss_fn, given, inputs["advantages"], mask))
        packed = {k: compacted(inputs[k], mask) for k in per_token}
        packed_mask = compacted(mask, mask)
        want = _loss_and_grad(loss_fn, packed, inputs["advantages"], packed_mask)
        (loss, grad, stats), (other_loss, other_grad, other_stats) = results
        assert torch.equal(loss, other_loss) and torch.equal(grad, other_grad)
        assert stats == other_stats
        assert (grad[~mask] == 0).all()
        torch.testing.assert_close(loss, want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compacted(grad, mask), want[1], rtol=1e-10, atol=1e-12)
        assert stats == pytest.approx(want[2], rel=1e-10, abs=1e-12), correction


def _loss_and_grad(loss_fn, per_token, advantages, mask):
    """The loss, its gradient with respect to the log-probs, and its statistics."""
    logprobs = per_token["logprobs"].clone().requires_grad_()
    others = {k: v for k, v in per_token.items() if k != "logprobs"}
    loss, stats = loss_fn(logprobs, advantages=advantages, mask=mask, **others)
    loss.backward()
    return loss.detach(), logprobs.grad, stats
