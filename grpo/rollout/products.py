"""The lean decoder's matrix products with a layer's weight: LoRA adapters merged, streamed
through a few-row kernel for models that stream their weights, stacked for small ones.

Decoding multiplies a few rows by every weight matrix once per token. For a model too big for
the CPU caches (SmolLM2: 540 MB of fp32) the products are bound by reading the weights: our
kernel (`few_rows.cpp`, built on first use) reads them in their own layout, faster than
oneDNN's packed kernel on CPUs with AVX2 but not AVX-512 and, with oneDNN's packing counted, for
up to 16 rows on AVX-512 CPUs; oneDNN serves the rest (and reads 2.3-4x faster than MKL's sgemm,
docs/performance.md). For a small model every product is per-call overhead, so q/k/v and
gate/up run as one product each, through our kernel too (its calls cost less than F.linear's).
All of these round differently from `F.linear`, so `modes` uses them for sampling only: greedy
decoding stays bit-exact with `generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from grpo.rollout import kernels

# Models with more bytes of weights than this stream them from memory on every decoding step.
STREAM_BYTES = 2**26
# Rows up to which our kernel streams weights faster than oneDNN's packed product on AVX-512
# CPUs too, its packing included (docs/performance.md, changes 21 and 22: SmolLM2 at 16 rows
# 3.3 against 4.0 s a generation, at 32 rows 6.6 against 5.7); CPUs with AVX2 but not AVX-512
# use ours for any number of rows (change 18).
KERNEL_ROWS = 16

Product = Callable[[torch.Tensor], torch.Tensor]


def modes(lm: PreTrainedModel, do_sample: bool) -> tuple[bool, bool]:
    """(stream, fuse) for a `sample` call: a streaming product (`streaming_product`) for the
    weights of CPU models too big for the caches, fused projections for small models; neither
    for greedy decoding."""
    big = weight_bytes(lm) > STREAM_BYTES
    on_cpu = next(lm.parameters()).device.type == "cpu"
    # whether any product streams: our kernel (at 1 row) or oneDNN's
    stream = do_sample and big and on_cpu and streaming_product(1) is not None
    return stream, do_sample and not big


def weight_bytes(lm: PreTrainedModel) -> int:
    """Bytes of all the model's parameters."""
    return sum(p.numel() * p.element_size() for p in lm.parameters())


@cache
def streaming_product(rows: int) -> type[FewRowsLinear] | type[PackedLinear] | None:
    """The product for weights streamed from memory on this CPU, for `rows` rows of input: our
    kernel where it builds and the CPU has AVX2 but not AVX-512, or for at most `KERNEL_ROWS`
    rows (where it was measured faster); else oneDNN's packed linear where this torch has it;
    else ours where it builds; else None (`F.linear`). The same for every projection of a
    `sample` call."""
    ours = FewRowsLinear if kernels.load("few_rows") is not None else None
    if ours and (rows <= KERNEL_ROWS or not torch.cpu._is_avx512_supported()):
        return ours
    ops = getattr(torch.ops, "mkldnn", None)
    if torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise"):
        return PackedLinear
    return ours


class FewRowsLinear:
    """An fp32 linear product through our few-row kernel (`few_rows.cpp`): the weight read in
    its own layout, no copy; a row's result does not depend on the other rows. Results differ
    from `F.linear` in the last bits. `rows` is not needed (`PackedLinear`'s signature)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight, self.bias = weight.contiguous(), bias
        self.kernel = kernels.load("few_rows")

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


def product(
    weight: torch.Tensor, bias: torch.Tensor | None, rows: int, stream: bool, fuse: bool
) -> Product:
    """The product with an fp32 `weight` for `rows` rows: `streaming_product` when `stream`; with
    `fuse` (a small model, its weights in cache) our few-row kernel, whose per-call cost is a
    third to two thirds of F.linear's at these sizes, where it builds; else F.linear."""
    if weight.dtype == torch.float32 and stream:
        return streaming_product(rows)(weight, bias, rows).forward
    if weight.dtype == torch.float32 and fuse and kernels.load("few_rows") is not None:
        return FewRowsLinear(weight, bias, rows).forward
    return partial(F.linear, weight=weight, bias=bias)


def projection(module: nn.Module, rows: int, stream: bool, fuse: bool) -> Product:
    """The product with `module`'s weight (`plain_weight`, through `product`); `module.forward`
    for any other layer."""
    weights = plain_weight(module)
    return module.forward if weights is None else product(*weights, rows, stream, fuse)


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
        stacked_product = product(stacked, bias, rows, stream, fuse)
        return lambda x: stacked_product(x).split(sizes, -1)
    each = [projection(m, rows, stream, fuse) for m in modules]
    return lambda x: tuple(p(x) for p in each)
