"""Every registered policy loss (the registry is enumerated: a new entry is covered without a
test edit), then the `clip` entry against its formula, edge by edge.

Generic properties, each from the papers: on-policy (ratio 1) every entry's gradient is the
plain policy gradient -A d log pi / (B |o_i|) (GRPO, GSPO, CISPO, SAPO, GMPO all reduce to it
there); padding never matters; a completion with no valid token adds nothing; gradcheck holds.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo.algorithm.loss import GRPOLoss
from grpo.algorithm.policy_losses import POLICY_LOSSES

LOSSES = list(POLICY_LOSSES)


def ragged(seed: int, batch: int = 5, length: int = 6) -> dict[str, torch.Tensor]:
    """Float64 log-probs, old log-probs that differ, advantages of both signs, ragged masks
    (row 2 has no valid token, row 0 one) and junk in every padded position."""
    gen = torch.Generator().manual_seed(seed)
    logp = -2 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    old = logp + 0.8 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    lengths[0], lengths[2] = 1, 0
    mask = torch.arange(length) < lengths.unsqueeze(1)
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    advantages[1] = -abs(advantages[1])
    junk = 5 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    return {
        "logp": torch.where(mask, logp, junk),
        "old": torch.where(mask, old, -junk),
        "advantages": advantages,
        "mask": mask,
    }


def loss_of(name: str, logp, old, advantages, mask, aggregation="seq_mean_token_mean"):
    fn = GRPOLoss(
        {"name": name}, kl={"coef": 0.0}, aggregation=aggregation, max_completion_length=6
    )
    return fn(logp, old, None, advantages, mask)


@pytest.mark.parametrize("name", LOSSES)
def test_on_policy_gradient_is_the_plain_policy_gradient(name):
    x = ragged(0)
    logp = torch.where(x["mask"], x["logp"], 0.0).requires_grad_()
    loss, _ = loss_of(name, logp, None, x["advantages"], x["mask"])
    loss.backward()
    lengths = x["mask"].sum(1, keepdim=True).clamp(min=1)
    expected = torch.where(x["mask"], -x["advantages"][:, None] / (len(lengths) * lengths), 0.0)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_padding_and_empty_rows_change_nothing(name):
    x = ragged(1)
    logp = x["logp"].clone().requires_grad_()
    loss, stats = loss_of(name, logp, x["old"], x["advantages"], x["mask"], "token_mean")
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~x["mask"]] == 0).all()
    # Other junk in the padding, or none, gives the same loss.
    clean = {k: torch.where(x["mask"], x[k], 0.0) for k in ("logp", "old")}
    same, _ = loss_of(name, clean["logp"], clean["old"], x["advantages"], x["mask"], "token_mean")
    torch.testing.assert_close(same, loss.detach(), rtol=1e-12, atol=1e-12)
    # The same batch without its empty row 2 gives the same token-mean loss.
    keep = [0, 1, 3, 4]
    again, _ = loss_of(
        name, x["logp"][keep], x["old"][keep], x["advantages"][keep], x["mask"][keep], "token_mean"
    )
    torch.testing.assert_close(again, loss.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_off_policy(name):
    x = ragged(2, batch=4, length=4)
    mask = x["mask"]
    logp = torch.where(mask, x["logp"], -1.0).requires_grad_()
    old = torch.where(mask, x["old"], -1.0)
    assert torch.autograd.gradcheck(
        lambda lp: loss_of(name, lp, old, x["advantages"], mask)[0], (logp,)
    )


@pytest.mark.parametrize("name", LOSSES)
def test_settings_are_keyword_only_with_defaults(name):
    """What a YAML may set: keyword-only parameters; the defaults let a name alone select it."""
    for setting, param in POLICY_LOSSES.settings(name).items():
        assert param.default is not param.empty, f"{name}.{setting} needs a default"


# ---------------------------------------------------------------------------------- clip


def clip_reference(ratio: float, a: float, low: float, high: float, dual: float | None) -> float:
    """PPO's clipped surrogate of one token, written out (DeepSeekMath eq. 3), as a loss."""
    surrogate = min(ratio * a, min(max(ratio, 1 - low), 1 + high) * a)
    if dual is not None and a < 0:
        surrogate = max(surrogate, dual * a)
    return -surrogate


@pytest.mark.parametrize("dual", [None, 3.0])
def test_clip_matches_its_formula_token_by_token(dual):
    x = ragged(5)
    mask = x["mask"]
    logp, old = torch.where(mask, x["logp"], 0.0), torch.where(mask, x["old"], 0.0)
    logp[1, 0], old[1, 0] = 0.0, -1.5  # ratio e^1.5 > 3 with A < 0: the dual clip binds
    out = POLICY_LOSSES["clip"](
        logp,
        old,
        x["advantages"][:, None],
        mask,
        clip_ratio=0.2,
        clip_ratio_high=0.28,
        dual_clip=dual,
    )
    for i, t in mask.nonzero().tolist():
        ratio, a = math.exp(logp[i, t] - old[i, t]), x["advantages"][i].item()
        assert out.loss[i, t].item() == pytest.approx(clip_reference(ratio, a, 0.2, 0.28, dual))
    assert out.clipped["clip_low"].any() and out.clipped["clip_high"].any()
    assert ("dual_clip" in out.clipped) == (dual is not None)


def single_token_grads(ratios, advantages, **settings):
    """Gradient of the loss w.r.t. each row's single token with the given ratio and advantage."""
    logp = torch.tensor(ratios, dtype=torch.float64).log().unsqueeze(1).requires_grad_()
    loss, stats = GRPOLoss({"name": "clip", **settings}, kl={"coef": 0.0})(
        logp,
        torch.zeros_like(logp),
        None,
        torch.tensor(advantages, dtype=torch.float64),
        torch.ones_like(logp, dtype=torch.bool),
    )
    loss.backward()
    return logp.grad.squeeze(1), stats


def test_clipped_in_direction_of_advantage_has_zero_gradient():
    grads, stats = single_token_grads([1.5, 0.5, 1.5, 0.5], [1.0, -1.0, -1.0, 1.0])
    assert grads[0] == 0  # ratio > 1 + eps and A > 0: no push further up
    assert grads[1] == 0  # ratio < 1 - eps and A < 0: no push further down
    # Clipped against the advantage: the unclipped term wins the min, d(-r A)/dlogp / B = -r A / 4.
    torch.testing.assert_close(grads[2:], torch.tensor([0.375, -0.125], dtype=torch.float64))
    assert (stats["clip_high_fraction"], stats["clip_low_fraction"]) == (0.25, 0.25)
    assert stats["clip_fraction"] == 0.5


def test_clip_higher_lets_rare_tokens_grow():
    symmetric, _ = single_token_grads([1.25], [1.0], clip_ratio=0.2)
    clip_higher, _ = single_token_grads([1.25], [1.0], clip_ratio=0.2, clip_ratio_high=0.28)
    assert symmetric[0] == 0
    assert clip_higher[0] == pytest.approx(-1.25)


def test_dual_clip_bounds_negative_advantage_tokens():
    plain, _ = single_token_grads([4.0, 4.0], [-1.0, 1.0])
    dual, stats = single_token_grads([4.0, 4.0], [-1.0, 1.0], dual_clip=3.0)
    assert plain[0] == pytest.approx(2.0)  # -r A / B = 4 / 2: unbounded without the dual clip
    assert dual[0] == 0
    assert plain[1] == dual[1] == 0  # A > 0 is clipped as usual, the dual clip does not apply
    assert stats["dual_clip_fraction"] == 0.5


def test_intellect2_delta_is_the_dual_clip():
    """INTELLECT-2's two-sided clipping (TRL `delta`): min(min(r, delta) A, clip(r) A), for
    every token; equal to the dual clip with c = delta, in value and gradient."""
    delta, eps = 4.0, 0.2
    ratios = torch.tensor([0.3, 0.9, 1.1, 2.0, 5.0, 9.0] * 2, dtype=torch.float64)
    a = torch.tensor([-1.0] * 6 + [1.0] * 6, dtype=torch.float64)
    logp = ratios.log().unsqueeze(1).requires_grad_()
    r = logp.exp()[:, 0]
    trl = -torch.minimum(r.clamp(max=delta) * a, r.clamp(1 - eps, 1 + eps) * a)
    (trl_grad,) = torch.autograd.grad(trl.sum(), logp)
    mask = torch.ones_like(logp, dtype=torch.bool)
    ours = POLICY_LOSSES["clip"](logp, torch.zeros_like(logp), a[:, None], mask, dual_clip=delta)
    (ours_grad,) = torch.autograd.grad(ours.loss.sum(), logp)
    torch.testing.assert_close(ours.loss[:, 0], trl)
    torch.testing.assert_close(ours_grad, trl_grad)


# ------------------------------------------------- references for the other entries (float64)
# Each entry below is checked against its paper's formula written out with python floats, on the
# ragged batch (rows of different lengths, a row with one token, an empty row, junk in padding)
# with old log-probs that differ from the current ones. The gradient of the reference is taken
# by central finite differences, or written out where the formula has a stop-gradient.

Rows = list[list[float]]


def valid_rows(x) -> tuple[Rows, Rows, list[float]]:
    """The valid tokens of each row of `ragged` as python floats: logp, old, and the advantages."""
    lengths = x["mask"].sum(1).tolist()
    logp = [x["logp"][i, :n].tolist() for i, n in enumerate(lengths)]
    old = [x["old"][i, :n].tolist() for i, n in enumerate(lengths)]
    return logp, old, x["advantages"].tolist()


def aggregate_rows(per_token: Rows, aggregation: str) -> float:
    """seq_mean_token_mean (an empty row counts in B and adds 0) or token_mean."""
    if aggregation == "seq_mean_token_mean":
        return sum(sum(row) / len(row) for row in per_token if row) / len(per_token)
    return sum(sum(row) for row in per_token) / sum(len(row) for row in per_token)


def finite_difference(f, logp: Rows, h: float = 1e-6) -> Rows:
    """d f / d logp[i][t] by central differences, f a function of the rows of logp."""
    grads = []
    for i, row in enumerate(logp):
        grads.append([])
        for t in range(len(row)):
            up = [list(r) for r in logp]
            down = [list(r) for r in logp]
            up[i][t] += h
            down[i][t] -= h
            grads[i].append((f(up) - f(down)) / (2 * h))
    return grads


def check_reference(name, settings, x, reference, aggregation, gradient=None, fd_tol=1e-7):
    """The entry's loss and gradient through GRPOLoss equal the reference's.

    reference(logp_rows, old_rows, advantages) -> per-token losses (rows); gradient (optional)
    gives d loss / d logp directly (rows), else finite differences of the reference are used.
    """
    logp_rows, old_rows, advantages = valid_rows(x)
    fn = GRPOLoss({"name": name, **settings}, kl={"coef": 0.0}, aggregation=aggregation)
    logp = x["logp"].clone().requires_grad_()
    loss, stats = fn(logp, x["old"], None, x["advantages"], x["mask"])
    (grad,) = torch.autograd.grad(loss, logp)

    def total(rows: Rows) -> float:
        return aggregate_rows(reference(rows, old_rows, advantages), aggregation)

    assert loss.item() == pytest.approx(total(logp_rows), rel=1e-12, abs=1e-14)
    if gradient is None:
        expected, tol = finite_difference(total, logp_rows), fd_tol
    else:
        expected, tol = gradient(logp_rows, old_rows, advantages), 1e-12
    for i, row in enumerate(expected):
        for t, value in enumerate(row):
            assert grad[i, t].item() == pytest.approx(value, rel=tol, abs=tol), (name, i, t)
    assert (grad[~x["mask"]] == 0).all()
    return stats


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ---------------------------------------------------------------------------------- sapo


def sapo_reference(tau_pos: float, tau_neg: float):
    """SAPO (arXiv 2511.20347): -f(r) A per token, f(r) = sigmoid(tau (r - 1)) 4 / tau."""

    def per_token(logp: Rows, old: Rows, advantages: list[float]) -> Rows:
        out = []
        for lp, od, a in zip(logp, old, advantages, strict=True):
            tau = tau_pos if a > 0 else tau_neg
            ratios = [math.exp(p - o) for p, o in zip(lp, od, strict=True)]
            out.append([-sigmoid(tau * (r - 1)) * 4 / tau * a for r in ratios])
        return out

    return per_token


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_sapo_matches_its_formula(taus, aggregation):
    settings = {"tau_pos": taus[0], "tau_neg": taus[1]}
    stats = check_reference("sapo", settings, ragged(6), sapo_reference(*taus), aggregation)
    assert stats["clip_fraction"] == 0  # a soft gate: no bound ever binds


@pytest.mark.parametrize("a", [1.5, -0.7])
def test_sapo_gate_at_ratio_one_is_the_plain_policy_gradient(a):
    """f(1) = 2 / tau and f'(1) = 1: on-policy the token's gradient is -A d log pi whatever tau."""
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([[a]], dtype=torch.float64)
    out = POLICY_LOSSES["sapo"](logp, logp.detach(), adv, mask, tau_pos=1.0, tau_neg=1.05)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    tau = 1.0 if a > 0 else 1.05
    assert out.loss.item() == pytest.approx(-2 / tau * a, rel=1e-15)
    assert grad.item() == pytest.approx(-a, rel=1e-15)
    # Away from r = 1 the gate's slope 4 sigmoid (1 - sigmoid) < 1: the update fades smoothly.
    far = torch.full((1, 1), 0.5, dtype=torch.float64, requires_grad=True)
    out = POLICY_LOSSES["sapo"](far, torch.zeros_like(far), adv, mask)
    (grad,) = torch.autograd.grad(out.loss.sum(), far)
    assert 0 < grad.item() / (-a * math.exp(0.5)) < 1


# ---------------------------------------------------------------------------------- gspo


def gspo_reference(low: float, high: float):
    """GSPO (arXiv 2507.18071): s_i = exp(mean_t log(pi / pi_old)), one clipped loss per
    completion, -min(s_i A_i, clip(s_i, 1 - low, 1 + high) A_i), on each of its tokens."""

    def per_token(logp: Rows, old: Rows, advantages: list[float]) -> Rows:
        out = []
        for lp, od, a in zip(logp, old, advantages, strict=True):
            if not lp:
                out.append([])
                continue
            s = math.exp(sum(p - o for p, o in zip(lp, od, strict=True)) / len(lp))
            loss = -min(s * a, min(max(s, 1 - low), 1 + high) * a)
            out.append([loss] * len(lp))
        return out

    return per_token


def gspo_token_gradient(low: float, high: float, aggregation: str):
    """d loss / d logp of GSPO-token, written out: the token's own -s_i A_i, 0 where the clip
    binds (s_i outside the range in the direction of A_i), times the aggregation's weight."""

    def gradient(logp: Rows, old: Rows, advantages: list[float]) -> Rows:
        tokens, out = sum(len(lp) for lp in logp), []
        for lp, od, a in zip(logp, old, advantages, strict=True):
            s = math.exp(sum(p - o for p, o in zip(lp, od, strict=True)) / max(len(lp), 1))
            bound = (s > 1 + high and a > 0) or (s < 1 - low and a < 0)
            per_row = aggregation == "seq_mean_token_mean"
            weight = 1 / (len(logp) * max(len(lp), 1)) if per_row else 1 / tokens
            out.append([0.0 if bound else -s * a * weight] * len(lp))
        return out

    return gradient


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_matches_its_formula(name, aggregation):
    # Wide ranges so that some completions are clipped and some are not; then the paper's.
    for low, high, seed in ((0.2, 0.28, 15), (3e-4, 4e-4, 8)):
        settings = {"clip_ratio": low, "clip_ratio_high": high}
        reference = gspo_reference(low, high)
        gradient = gspo_token_gradient(low, high, aggregation) if name == "gspo_token" else None
        x = ragged(seed)
        stats = check_reference(name, settings, x, reference, aggregation, gradient)
        if low == 0.2:  # both bounds bind somewhere, and some completions are inside
            assert stats["clip_low_fraction"] > 0 and stats["clip_high_fraction"] > 0
            assert stats["clip_fraction"] < 1


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_gspo_token_equals_gspo_for_sequence_advantages(aggregation):
    x = ragged(26)
    out = {}
    for name in ("gspo", "gspo_token"):
        fn = GRPOLoss(
            {"name": name, "clip_ratio": 0.2, "clip_ratio_high": 0.28},
            kl={"coef": 0.0},
            aggregation=aggregation,
        )
        logp = x["logp"].clone().requires_grad_()
        loss, stats = fn(logp, x["old"], None, x["advantages"], x["mask"])
        out[name] = (loss, torch.autograd.grad(loss, logp)[0], stats)
    torch.testing.assert_close(out["gspo_token"][0], out["gspo"][0], rtol=1e-14, atol=0)
    torch.testing.assert_close(out["gspo_token"][1], out["gspo"][1], rtol=1e-12, atol=1e-15)
    assert out["gspo_token"][2]["clip_fraction"] == out["gspo"][2]["clip_fraction"] > 0


def test_gspo_clips_whole_completions_and_refuses_token_advantages():
    """s_i is the geometric mean of the token ratios: one token's large ratio is diluted by
    the completion's length, and where s_i leaves the range every token of it stops."""
    logp = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, False, False, False]])
    adv = torch.ones(2, 1, dtype=torch.float64)
    out = POLICY_LOSSES["gspo"](logp, torch.zeros_like(logp), adv, mask, clip_ratio_high=0.2)
    # Row 0: s = e^(0.5 / 4) = 1.133 < 1.2, unclipped; row 1: s = e^0.5 = 1.65, clipped.
    assert out.clipped["clip_high"].tolist() == [[False], [True]]
    assert out.loss[0].tolist() == pytest.approx([-math.exp(0.125)] * 4)
    assert out.loss[1].tolist() == pytest.approx([-1.2, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"'gspo' needs one advantage per completion"):
        POLICY_LOSSES["gspo"](logp, logp, torch.ones_like(logp), mask)
    # GSPO-token takes them: a token's own advantage scales its own gradient.
    token = POLICY_LOSSES["gspo_token"](logp, logp, torch.ones_like(logp), mask)
    assert token.loss.shape == logp.shape


# --------------------------------------------------------------------------------- cispo


def cispo_weight(r: float, low: float | None, high: float) -> float:
    """clip(r, 1 - low, 1 + high), no lower bound when low is None."""
    return min(r if low is None else max(r, 1 - low), 1 + high)


def cispo_reference(low: float | None, high: float):
    """CISPO's loss per token, written out: -r A inside [1 - low, 1 + high], continued linearly
    in log r outside it (w (1 + log r - log w) with w the clipped weight): the function whose
    derivative is the paper's -sg(clip(r)) A."""

    def per_token(logp: Rows, old: Rows, advantages: list[float]) -> Rows:
        out = []
        for lp, od, a in zip(logp, old, advantages, strict=True):
            row = []
            for p, o in zip(lp, od, strict=True):
                w = cispo_weight(math.exp(p - o), low, high)
                row.append(-a * w * (1 + (p - o) - math.log(w)))
            out.append(row)
        return out

    return per_token


def cispo_gradient(low: float | None, high: float, aggregation: str):
    """The paper's gradient (MiniMax-M1 section 3.1), written out: sg(clip(r)) A d log pi for
    every token (as a loss: minus that), times the aggregation's weight."""

    def gradient(logp: Rows, old: Rows, advantages: list[float]) -> Rows:
        tokens = sum(len(lp) for lp in logp)
        out = []
        for lp, od, a in zip(logp, old, advantages, strict=True):
            per_row = aggregation == "seq_mean_token_mean"
            weight = 1 / (len(logp) * max(len(lp), 1)) if per_row else 1 / tokens
            ratios = [math.exp(p - o) for p, o in zip(lp, od, strict=True)]
            out.append([-cispo_weight(r, low, high) * a * weight for r in ratios])
        return out

    return gradient


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("low_high", [(None, 4.0), (None, 0.28), (0.2, 0.28)])
def test_cispo_matches_its_formula_and_gradient(low_high, aggregation):
    low, high = low_high
    settings = {"clip_ratio": low, "clip_ratio_high": high}
    x = ragged(10)
    reference = cispo_reference(low, high)
    stats = check_reference(
        "cispo", settings, x, reference, aggregation, cispo_gradient(low, high, aggregation)
    )
    # The gradient is also the derivative of the value (finite differences of the reference).
    check_reference("cispo", settings, x, reference, aggregation)
    # Truncated weights are logged apart from clip_fraction: those tokens keep their gradient.
    assert stats["clip_fraction"] == 0
    if high == 0.28:
        assert stats["truncated_high_fraction"] > 0
    assert ("truncated_low_fraction" in stats) == (low is not None)
    if low is not None:
        assert stats["truncated_low_fraction"] > 0


@pytest.mark.parametrize("low", [None, 0.2])
def test_cispo_gradient_is_the_papers_detached_weight_times_the_score(low):
    """The paper's literal per-token objective sg(clip(r)) A log pi, differentiated by autograd,
    gives our gradient token by token (values differ: see the docstring)."""
    x = ragged(11)
    mask, adv = x["mask"], x["advantages"][:, None]
    logp = x["logp"].clone().requires_grad_()
    ours = POLICY_LOSSES["cispo"](logp, x["old"], adv, mask, clip_ratio=low, clip_ratio_high=0.28)
    (ours_grad,) = torch.autograd.grad(ours.loss.sum(), logp)
    ratio = torch.exp(logp - x["old"])
    weight = ratio.clamp(min=None if low is None else 1 - low, max=1.28).detach()
    literal = torch.where(mask, -weight * adv * logp, 0.0)
    (literal_grad,) = torch.autograd.grad(literal.sum(), logp)
    torch.testing.assert_close(ours_grad, literal_grad, rtol=1e-13, atol=1e-15)
    # Inside the range the value is the unclipped surrogate -r A.
    inside = mask & ~ours.clipped["truncated_high"]
    if low is not None:
        inside &= ~ours.clipped["truncated_low"]
    torch.testing.assert_close(ours.loss[inside], -(ratio * adv)[inside].detach())
    assert inside.any() and (mask & ~inside).any()


def test_cispo_keeps_the_gradient_where_the_clip_would_drop_it():
    """A token with r = 3 and A > 0: PPO's clip gives it no gradient, CISPO the truncated
    weight's, 1 + eps_high; with no lower bound a token with r = 0.01 keeps its weight 0.01."""
    logp = torch.tensor([[math.log(3.0)], [math.log(0.01)]], dtype=torch.float64)
    logp.requires_grad_()
    old, mask = torch.zeros_like(logp), torch.ones_like(logp, dtype=torch.bool)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    grads = {}
    for name in ("clip", "cispo"):
        out = POLICY_LOSSES[name](logp, old, adv, mask, clip_ratio_high=0.28)
        (grads[name],) = torch.autograd.grad(out.loss.sum(), logp)
    assert grads["clip"][:, 0].tolist() == [0.0, 0.0]
    assert grads["cispo"][:, 0].tolist() == pytest.approx([-1.28, 0.01])
    assert out.clipped["truncated_high"][:, 0].tolist() == [True, False]


# ---------------------------------------------------------------------------------- gmpo


def gmpo_reference(low: float, high: float):
    """GMPO (arXiv 2507.20673): -A exp(mean_t d'_t) on each token of the completion, d'_t the
    log-ratio clipped to [-low, high] on the side A pushes (min for A > 0, max otherwise)."""

    def per_token(logp: Rows, old: Rows, advantages: list[float]) -> Rows:
        out = []
        for lp, od, a in zip(logp, old, advantages, strict=True):
            clipped = []
            for p, o in zip(lp, od, strict=True):
                d = p - o
                c = min(max(d, -low), high)
                clipped.append(min(d, c) if a > 0 else max(d, c))
            value = -a * math.exp(sum(clipped) / len(clipped)) if clipped else 0.0
            out.append([value] * len(lp))
        return out

    return per_token


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("low_high", [(0.4, None), (0.3, 0.5)])
def test_gmpo_matches_its_formula(low_high, aggregation):
    low, high = low_high
    settings = {"clip_log_ratio": low, "clip_log_ratio_high": high}
    reference = gmpo_reference(low, low if high is None else high)
    stats = check_reference("gmpo", settings, ragged(17), reference, aggregation)
    assert stats["clip_low_fraction"] > 0 and stats["clip_high_fraction"] > 0


def test_gmpo_clips_one_token_on_the_side_of_the_advantage():
    """A token with log-ratio 1 > 0.4: with A > 0 it is clipped (no gradient, the other tokens
    keep theirs); with A < 0 the clip does not bind on that side (PPO's min, per token)."""
    logp = torch.tensor([[1.0, 0.1, -0.1]] * 2, dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logp, dtype=torch.bool)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    out = POLICY_LOSSES["gmpo"](logp, torch.zeros_like(logp), adv, mask)
    (grad,) = torch.autograd.grad(out.loss[:, 0].sum(), logp)
    assert out.loss[0, 0].item() == pytest.approx(-math.exp(0.4 / 3))
    assert out.loss[1, 0].item() == pytest.approx(math.exp(1.0 / 3))
    assert grad[0, 0] == 0 and (grad[0, 1:] != 0).all() and (grad[1] != 0).all()
    assert out.clipped["clip_high"][0].tolist() == [True, False, False]
    assert not out.clipped["clip_low"].any() and not out.clipped["clip_high"][1].any()


def test_gmpo_equals_gspo_where_neither_clips():
    """Without a binding clip both weigh the completion by the geometric mean of its token
    ratios, so the two losses agree in value and gradient."""
    x = ragged(13)
    old = x["logp"] + 0.05 * torch.randn(x["logp"].shape, dtype=torch.float64)  # |d| < 0.4
    settings = {
        "gmpo": {"clip_log_ratio": 0.4},
        "gspo": {"clip_ratio": 0.5, "clip_ratio_high": 0.5},
    }
    out = {}
    for name, extra in settings.items():
        logp = x["logp"].clone().requires_grad_()
        fn = GRPOLoss({"name": name, **extra}, kl={"coef": 0.0})
        loss, stats = fn(logp, old, None, x["advantages"], x["mask"])
        out[name] = (loss, torch.autograd.grad(loss, logp)[0], stats["clip_fraction"])
    assert out["gmpo"][2] == out["gspo"][2] == 0
    torch.testing.assert_close(out["gmpo"][0], out["gspo"][0], rtol=1e-13, atol=0)
    torch.testing.assert_close(out["gmpo"][1], out["gspo"][1], rtol=1e-12, atol=1e-15)


# ------------------------------------------------------- top-entropy token selection
# With `algorithm.loss.top_entropy_quantile` < 1 the caller passes the selected tokens; GRPOLoss
# gives them to the policy loss as its mask. Sequence-level entries form their ratio from the
# selected tokens alone: no policy gradient reaches the others (docs/algorithms.md).


def selection(x, seed: int = 0) -> torch.Tensor:
    """About half of the valid tokens, with rows 1 and 3 both partly selected and row 4 valid
    but without any selected token."""
    gen = torch.Generator().manual_seed(seed)
    selected = x["mask"] & (torch.rand(x["mask"].shape, generator=gen) < 0.5)
    selected[1, :2] = torch.tensor([True, False])
    selected[3, :2] = torch.tensor([False, True])
    selected[4] = False
    return selected


def selected_loss(name, logp, old, x, selected, aggregation="seq_mean_token_mean", **settings):
    fn = GRPOLoss(
        {"name": name, **settings},
        kl={"coef": 0.0},
        aggregation=aggregation,
        top_entropy_quantile=0.5,
    )
    return fn(logp, old, None, x["advantages"], x["mask"], selected=selected)


@pytest.mark.parametrize("name", LOSSES)
def test_on_policy_selection_gives_the_plain_policy_gradient_on_selected_tokens(name):
    """At ratio 1 every entry gives each selected token -A_i / (B |o_i|), as without selection,
    and every other token exactly 0."""
    x = ragged(0)
    selected = selection(x)
    logp = torch.where(x["mask"], x["logp"], 0.0).requires_grad_()
    loss, _ = selected_loss(name, logp, None, x, selected)
    loss.backward()
    lengths = x["mask"].sum(1, keepdim=True).clamp(min=1)
    expected = torch.where(selected, -x["advantages"][:, None] / (len(lengths) * lengths), 0.0)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("name", LOSSES)
def test_no_policy_gradient_reaches_unselected_tokens(name, aggregation):
    """Off-policy, for every entry: the gradient w.r.t. an unselected token's log-prob is exactly
    0 and the loss does not depend on it at all; selected tokens get gradient."""
    x = ragged(3)
    selected = selection(x)
    logp = x["logp"].clone().requires_grad_()
    loss, _ = selected_loss(name, logp, x["old"], x, selected, aggregation)
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad[~selected] == 0).all()
    assert (grad[selected] != 0).sum() >= 2
    moved = torch.where(selected, x["logp"], x["logp"] + 0.7)  # only the unselected tokens move
    again, _ = selected_loss(name, moved, x["old"], x, selected, aggregation)
    assert again.item() == loss.item()


def selected_rows(x, selected) -> tuple[Rows, Rows, list[float], list[int]]:
    """The selected tokens of each row as python floats: logp, old, the advantages, and the
    number of valid tokens of each row (|o_i|, the aggregation's normaliser)."""
    logp, old = [], []
    for i in range(len(selected)):
        picked = selected[i].nonzero().flatten().tolist()
        logp.append([x["logp"][i, t].item() for t in picked])
        old.append([x["old"][i, t].item() for t in picked])
    return logp, old, x["advantages"].tolist(), x["mask"].sum(1).tolist()


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize(
    ("name", "settings", "reference"),
    [
        ("gspo", {"clip_ratio": 0.2, "clip_ratio_high": 0.28}, gspo_reference(0.2, 0.28)),
        ("gspo_token", {"clip_ratio": 0.2, "clip_ratio_high": 0.28}, gspo_reference(0.2, 0.28)),
        ("gspo", {}, gspo_reference(3e-4, 4e-4)),
        ("gmpo", {}, gmpo_reference(0.4, 0.4)),
        ("gmpo", {"clip_log_ratio": 0.3, "clip_log_ratio_high": 0.5}, gmpo_reference(0.3, 0.5)),
    ],
    ids=["gspo-wide", "gspo_token-wide", "gspo", "gmpo", "gmpo-unequal"],
)
def test_sequence_losses_form_their_ratio_from_the_selected_tokens(
    name, settings, reference, aggregation
):
    """The value is the paper's formula over each completion's selected tokens S_i (s_i, or
    GMPO's mean, over S_i alone), its loss on each of them, aggregated over the valid tokens as
    any per-token loss: (1/B) sum_i (1/|o_i|) sum_{t in S_i} loss_i, or / sum_i |o_i|. The
    gradient w.r.t. the selected log-probs is that formula's (finite differences)."""
    x = ragged(57)
    selected = selection(x, seed=3)
    logp_rows, old_rows, advantages, lengths = selected_rows(x, selected)

    def total(rows: Rows) -> float:
        per_token = reference(rows, old_rows, advantages)
        if aggregation == "seq_mean_token_mean":
            per_row = [sum(r) / n for r, n in zip(per_token, lengths, strict=True) if n]
            return sum(per_row) / len(lengths)
        return sum(sum(r) for r in per_token) / sum(lengths)

    logp = x["logp"].clone().requires_grad_()
    loss, stats = selected_loss(name, logp, x["old"], x, selected, aggregation, **settings)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(total(logp_rows), rel=1e-12, abs=1e-14)
    expected = finite_difference(total, logp_rows)
    for i, row in enumerate(expected):
        picked = selected[i].nonzero().flatten().tolist()
        got = [grad[i, t].item() for t in picked]
        assert got == pytest.approx(row, rel=1e-7, abs=1e-7), (name, i)
    assert (grad[~selected] == 0).all()
    assert stats["masked_fraction"] > 0
    assert stats["clip_low_fraction"] > 0 and stats["clip_high_fraction"] > 0
