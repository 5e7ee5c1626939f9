"""Our C++ kernels for the lean decoder (`few_rows.cpp`, `decode_ops.cpp` beside this file),
compiled on first use with `torch.utils.cpp_extension` (once per machine and torch: torch caches
each build under TORCH_EXTENSIONS_DIR, ~45 s; `make install` builds them). They need AVX2 and
FMA; where a kernel cannot build (no compiler, another CPU), one note on stderr and the decoder
keeps ATen's operations."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

SOURCES = Path(__file__).parent
NAMES = ("few_rows", "decode_ops")  # <name>.cpp beside this file
# OpenMP: the kernels split their work over torch's threads (at::parallel_for).
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


@cache
def load(name: str) -> ModuleType | None:
    """`<name>.cpp` compiled and loaded; None where it cannot be, said in one line."""
    if not torch.cpu._is_avx2_supported():
        return None
    from torch.utils.cpp_extension import load as build

    source = SOURCES / f"{name}.cpp"
    try:
        return build(f"grpo_{name}", [str(source)], extra_cflags=FLAGS, extra_ldflags=FLAGS[-1:])
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
        # no compiler or ninja, a failed build: the first line of what torch says
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        print(
            f"note: decoding with ATen's operations, {source.name} did not build: {reason}",
            file=sys.stderr,
        )
        return None
