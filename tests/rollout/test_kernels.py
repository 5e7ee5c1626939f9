"""Our C++ kernels for the lean decoder (grpo.rollout.kernels): `decode_ops.cpp`'s fused
operations against float64 arithmetic, and a kernel that cannot build. `few_rows.cpp`'s product:
tests/rollout/test_products.py; the decoder sampling through both: tests/rollout/test_lean.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import built_kernel

from grpo.rollout import kernels


@pytest.fixture(scope="module")
def ops():
    return built_kernel("decode_ops")


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("add", [False, True])
def test_add_rms_norm_adds_in_place_and_normalises(ops, add):
    torch.manual_seed(0)
    wide = torch.randn(5, 200) * 3  # rows of 96 in a wider buffer: strided rows
    h, y, weight = wide[:, :96], torch.randn(5, 96), torch.randn(96)
    total = h.double() + (y.double() if add else 0.0)
    expected = total * (total.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * weight.double()
    got = ops.add_rms_norm(h, y if add else None, weight, 1e-6)
    close(got, expected)
    close(h, total)  # the residual stream, added to in place


def test_silu_mul_over_the_float_range(ops):
    gate = torch.linspace(-100.0, 100.0, 4000).view(5, 800)
    up = torch.randn(5, 800)
    expected = gate.double() * torch.sigmoid(gate.double()) * up.double()
    close(ops.silu_mul(gate, up), expected)


def reference_attention(q, k, v, cos, sin, positions, keys, values, slot, mask, scale):
    """The decoder's ATen path in float64: rotary embedding (sin with its first half negated),
    the cache write, then each query head over its key/value head's slots 0..slot."""
    rows, kv_heads, _, d = keys.shape
    keys, values = keys.double().clone(), values.double().clone()

    def rotate(x):  # (rows, heads, d)
        c, s = cos.double()[positions][:, None], sin.double()[positions][:, None]
        return x * c + x.roll(d // 2, -1) * s

    queries = rotate(q.double().view(rows, -1, d))
    keys[:, :, slot] = rotate(k.double().view(rows, kv_heads, d))
    values[:, :, slot] = v.double().view(rows, kv_heads, d)
    groups = queries.shape[1] // kv_heads
    scores = torch.einsum("rhd,rhtd->rht", queries, keys.repeat_interleave(groups, 1)) * scale
    scores = scores[..., : slot + 1].masked_fill(~mask[:, None, : slot + 1], -torch.inf)
    weights = scores.softmax(-1)
    out = torch.einsum(
        "rht,rhtd->rhd", weights, values.repeat_interleave(groups, 1)[:, :, : slot + 1]
    )
    return out.reshape(rows, -1), keys, values


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (4, 1)])
@pytest.mark.parametrize("d", [16, 64, 72, 128])
def test_attend_rotates_writes_the_cache_and_attends(ops, heads, kv_heads, d):
    torch.manual_seed(d + heads)
    rows, capacity, slot = 5, 40, 30
    q, k, v = (torch.randn(rows, h * d) for h in (heads, kv_heads, kv_heads))
    angles = torch.rand(64, d // 2) * 6.3
    cos = torch.cat([angles.cos()] * 2, -1)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)
    positions = torch.tensor([3, 40, 63, 0, 17])
    keys, values = (
        torch.randn(rows, kv_heads, capacity, d),
        torch.randn(rows, kv_heads, capacity, d),
    )
    mask = torch.ones(rows, capacity, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[3, :29] = False  # a row that attends only to slots 29 and 30
    scale = d**-0.5
    expected, expected_keys, expected_values = reference_attention(
        q, k, v, cos, sin, positions, keys, values, slot, mask, scale
    )
    got = ops.attend(q, k, v, cos, sin, positions, keys, values, slot, mask, scale)
    close(got, expected)
    close(keys, expected_keys)
    close(values, expected_values)


def test_attend_reads_strided_projections(ops):
    """q, k and v as column slices of one stacked product (a small model's fused q/k/v)."""
    torch.manual_seed(1)
    qkv = torch.randn(3, 4 * 16 + 2 * 2 * 16)
    q, k, v = qkv.split([64, 32, 32], -1)
    cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
    positions, mask = torch.zeros(3, dtype=torch.long), torch.ones(3, 10, dtype=torch.bool)
    keys, values = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    args = (cos, sin, positions, keys, values, 4, mask, 0.25)
    got = ops.attend(q, k, v, *args)
    contiguous = ops.attend(q.contiguous(), k.contiguous(), v.contiguous(), *args)
    assert torch.equal(got, contiguous)


def test_attend_refuses_a_position_outside_its_tables(ops):
    q, k, v = torch.randn(1, 16), torch.randn(1, 16), torch.randn(1, 16)
    keys, values = torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="position outside the rotary tables"):
        ops.attend(
            q,
            k,
            v,
            torch.ones(2, 16),
            torch.zeros(2, 16),
            torch.tensor([2]),
            keys,
            values,
            0,
            None,
            1.0,
        )


@pytest.mark.parametrize("name", kernels.NAMES)
def test_a_kernel_that_does_not_build_is_none_with_one_line(tmp_path, name):
    """No compiler (CXX fails): a note on stderr naming the source, and no kernel."""
    code = f"from grpo.rollout import kernels\nprint(kernels.load({name!r}) is None)"
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True"]
    notes = [line for line in run.stderr.splitlines() if line.startswith("note:")]
    if torch.cpu._is_avx2_supported():
        assert len(notes) == 1 and f"{name}.cpp did not build" in notes[0], run.stderr
