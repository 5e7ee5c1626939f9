"""The lean decoder's products (grpo.rollout.products): our few-row kernel against float64
arithmetic, its results independent of the other rows and of the thread count, and the fallback
when it cannot build. The decoder sampling through each product: tests/rollout/test_lean.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import built_kernel

from grpo.rollout import products


@pytest.fixture(scope="module")
def kernel():
    return built_kernel("few_rows")


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17])
# 43: a tail of 3; 1100: past 1024 columns, where rows go 4 to a pass
@pytest.mark.parametrize(("outputs", "columns"), [(200, 576), (37, 43), (70, 1100)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_equals_float64_arithmetic(kernel, rows, outputs, columns, bias):
    torch.manual_seed(rows + columns)
    x, w = torch.randn(rows, columns), torch.randn(outputs, columns)
    b = torch.randn(outputs) if bias else None
    expected = x.double() @ w.double().T + (b.double() if bias else 0.0)
    got = kernel.linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (rows, outputs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * columns**0.5)


def test_few_rows_linear_takes_any_leading_shape_and_strides(kernel):
    x, w = torch.randn(3, 2, 40), torch.randn(24, 40)
    got = kernel.linear(x.transpose(0, 1), w, None)  # not contiguous
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, torch.nn.functional.linear(x.transpose(0, 1), w))


@pytest.mark.parametrize("columns", [576, 1100])
def test_a_rows_result_depends_on_no_other_row_nor_the_thread_count(kernel, columns):
    torch.manual_seed(0)
    x, w = torch.randn(13, columns), torch.randn(300, columns)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = kernel.linear(x, w, None)
        torch.set_num_threads(1)
        alone = torch.cat([kernel.linear(x[i : i + 1], w, None) for i in range(13)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, alone)


def test_a_kernel_that_does_not_build_leaves_onednn_with_one_line(tmp_path):
    """No compiler (CXX fails): a note on stderr, no kernel, oneDNN's product (where the
    CPU has AVX2; without it the kernel is not tried)."""
    code = (
        "from grpo.rollout import kernels, products\n"
        "print(kernels.load('few_rows') is None, products.streaming_product(8).__name__)"
    )
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "PackedLinear"]
    notes = [line for line in run.stderr.splitlines() if line.startswith("note:")]
    if torch.cpu._is_avx2_supported():
        assert len(notes) == 1 and "few_rows.cpp did not build" in notes[0], run.stderr


def test_the_streaming_product_by_cpu_and_rows(kernel):
    """Ours up to KERNEL_ROWS rows on every CPU it builds on; above, oneDNN's packed product on
    AVX-512 CPUs and ours on the others."""
    assert products.streaming_product(products.KERNEL_ROWS) is products.FewRowsLinear
    above = products.streaming_product(products.KERNEL_ROWS + 1)
    avx512 = torch.cpu._is_avx512_supported()
    assert above is (products.PackedLinear if avx512 else products.FewRowsLinear)
