"""The lean decoder's matrix products with a layer's weight: LoRA adapters merged, streamed
through a few-row kernel for models that stream their weights, stacked for small ones.

Decoding multiplies a few rows by every weight matrix once per token. For a model too big for
the CPU caches (SmolLM2: 540 MB of fp32) the products are bound by reading the weights: on CPUs
with AVX2 but not AVX-512, our kernel (`few_rows.cpp`, built on first use) reads them in their
own layout 1.5-1.7x faster than oneDNN's packed kernel, which still serves AVX-512 CPUs (and
reads 2.3-4x faster than MKL's sgemm, docs/performance.md); for a small model every product is
per-call overhead, so q/k/v and gate/up run as one product each. All of these round differently
from `F.linear`, so `modes` uses them for sampling only: greedy decoding stays bit-exact with
`generate`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

# Models with more bytes of weights than this stream them from memory on every decoding step.
STREAM_BYTES = 2**26
KERNEL_SOURCE = Path(__file__).with_name("few_rows.cpp")

Product = Callable[[torch.Tensor], torch.Tensor]


def modes(lm: PreTrainedModel, do_sample: bool) -> tuple[bool, bool]:
    """(stream, fuse) for a `sample` call: a streaming product (`streaming_product`) for the
    weights of CPU models too big for the caches, fused projections for small models; neither
    for greedy decoding."""
    big = weight_bytes(lm) > STREAM_BYTES
    on_cpu = next(lm.parameters()).device.type == "cpu"
    stream = do_sample and big and on_cpu and streaming_product() is not None
    return stream, do_sample and not big


def weight_bytes(lm: PreTrainedModel) -> int:
    """Bytes of all the model's parameters."""
    return sum(p.numel() * p.element_size() for p in lm.parameters())


@cache
def streaming_product() -> type[FewRowsLinear] | type[PackedLinear] | None:
    """The product for weights streamed from memory on this CPU: our kernel where the CPU has
    AVX2 but not AVX-512 (where it was measured) and it builds; else oneDNN's packed linear
    where this torch has it; else None (`F.linear`). Chosen once per process: `modes` and
    every projection of a `sample` call ask."""
    avx2_only = torch.cpu._is_avx2_supported() and not torch.cpu._is_avx512_supported()
    if avx2_only and few_rows_kernel() is not None:
        return FewRowsLinear
    ops = getattr(torch.ops, "mkldnn", None)
    if torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise"):
        return PackedLinear
    return None


@cache
def few_rows_kernel() -> ModuleType | None:
    """`few_rows.cpp` compiled (once per machine and torch: torch caches the build under
    TORCH_EXTENSIONS_DIR, ~45 s) and loaded; None where it cannot be, said in one line."""
    if not torch.cpu._is_avx2_supported():
        return None
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: torch's threads (at::parallel_for)
    try:
        return load(
            "grpo_few_rows", [str(KERNEL_SOURCE)], extra_cflags=flags, extra_ldflags=flags[-1:]
        )
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
        # no compiler or ninja, a failed build: the first line of what torch says
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        print(
            f"note: decoding with oneDNN's products, {KERNEL_SOURCE.name} did not build: {reason}",
            file=sys.stderr,
        )
        return None


class FewRowsLinear:
    """An fp32 linear product through our few-row kernel (`few_rows.cpp`): the weight read in
    its own layout, no copy; a row's result does not depend on the other rows. Results differ
    from `F.linear` in the last bits. `rows` is not needed (`PackedLinear`'s signature)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight, self.bias = weight.contiguous(), bias
        self.kernel = few_rows_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.weight, self.bias)


class PackedLinear:
    """An fp32 linear product whose weight oneDNN has re-laid out once for `rows` rows.

    Decoding multiplies a few rows by every weight matrix, once per token: the products are
    bound by streaming the weights from memory, and MKL's sgemm streams them at about half the
    rate oneDNN's blocked layout allows. Packing once per `sample` call makes SmolLM2's products
    with 8 rows 2.5-4x faster (docs/performance.md) for a transient copy of the weights; results
    differ from `F.linear` in the last bits.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def lora_merged(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """For a peft LoRA layer with active, unmerged adapters: its weight with the adapters
    merged in, W + sum of B A scaling, and its bias; else None."""
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(module, "get_delta_weight"):
        return None
    if module.disable_adapters or module.merged or not module.active_adapters:
        return None
    weight = base.weight
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter)
    return weight, base.bias


def plain_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A plain linear layer's (weight, bias), a LoRA layer's with its adapters merged (one
    matrix product per token instead of three); None for anything else (4-bit, ...)."""
    merged = lora_merged(module)
    if merged is not None:
        return merged
    return (module.weight, module.bias) if type(module) is nn.Linear else None


def projection(module: nn.Module, rows: int, stream: bool) -> Product:
    """The product with `module`'s weight (`plain_weight`), through `streaming_product` when
    `stream` (fp32); else `module.forward`."""
    weights = plain_weight(module)
    if weights is None:
        return module.forward
    if stream and weights[0].dtype == torch.float32:
        return streaming_product()(*weights, rows).forward
    return partial(F.linear, weight=weights[0], bias=weights[1])


def projections(
    modules: tuple[nn.Module, ...], rows: int, stream: bool, fuse: bool
) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """One input through several projections (q, k, v; gate, up): their outputs.

    With `fuse` and plain weights (`plain_weight`, biases on all or none), one product with the
    weights stacked: a small model's products are all per-call overhead, so three calls cost
    nearly three times one. The outputs differ from separate products in the last bits.
    """
    weights = [plain_weight(m) for m in modules]
    biases = [None if w is None else w[1] is not None for w in weights]
    if fuse and None not in weights and len(set(biases)) == 1:
        stacked = torch.cat([w for w, _ in weights])
        bias = torch.cat([b for _, b in weights]) if biases[0] else None
        sizes = [w.shape[0] for w, _ in weights]
        return lambda x: F.linear(x, stacked, bias).split(sizes, -1)
    products = [projection(m, rows, stream) for m in modules]
    return lambda x: tuple(product(x) for product in products)
