"""The process's heap (glibc malloc): freed memory kept for the next tensor, or given back.

By default glibc maps every allocation above its mmap threshold (32 MiB at most) afresh and
unmaps it when freed, and gives the top of the heap back once more than its trim threshold is
free. An update allocates and frees the same large tensors every micro-batch (the gradients, the
LM head's (rows x vocabulary) products, the saved activations), so it touched fresh pages for
them every time: the kernel zeroes and maps each 4 KiB page on its first touch, about 2 GB of
page faults per update of the bench's SmolLM2 full fine-tuning (docs/performance.md, change 19).
Within `kept` every allocation comes from the heap and what is freed stays there for the next
one; after it, and where peak memory needs it (the lean decoder, around sampling), `trim` gives
the free memory back. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

# mallopt parameters and glibc's values for them (malloc.h, malloc.c)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 2 * 32 * 2**20  # where glibc's dynamic threshold ends up: 2 x 32 MiB
KEEP_BYTES = 2**31 - 1  # free memory the heap keeps at its top within `kept` (an int)


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, where there is one (loaded once per process: each update and sampling call asks)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def kept(enabled: bool = True) -> Iterator[bool]:
    """Within: large allocations come from the heap (no mmap) and freed memory stays in the
    process for the next one; after: glibc's limits again and the free memory given back
    (`trim`). Yields whether the heap keeps freed memory."""
    libc = _libc() if enabled else None
    if libc is None:
        yield False
        return
    took = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    try:
        yield took
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        trim()


def trim() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`).

    The allocator keeps freed memory (the last update's activations and gradients, packed or
    merged weights) mapped; without this, the decoder's copies of weights and the next update's
    tensors land on top of it and the peak resident memory grows by their size.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
