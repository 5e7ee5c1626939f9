"""The heap policy (`grpo.heap`), in fresh processes (it changes the process's allocator):
within `kept`, large tensors freed and allocated again reuse their pages; after it the free
memory is given back. Page faults and resident memory are counts, not timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo import heap

PROBE = """
import json, resource, sys
import torch
from grpo import heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

out = {"faults": []}
hidden = torch.randn(128, 576)
with heap.kept(sys.argv[1] == "keep") as kept:
    for _ in range(10):  # an update's micro-batches: SmolLM2's LM-head gradients, 113 MB each
        start = faults()
        grad = torch.zeros(49152, 576)
        grad += torch.randn(49152, 128) @ hidden
        out["faults"].append(faults() - start)
        del grad
    out["resident_inside"] = resident_mb()
out["kept"], out["resident_after"] = kept, resident_mb()
print(json.dumps(out))
"""


def probe(mode: str) -> dict:
    """PROBE run in a fresh Python process, inside `heap.kept` (`keep`) or not."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(heap._libc() is None, reason="glibc only")
def test_kept_reuses_large_tensors_pages_and_gives_them_back_after():
    default, kept = probe("default"), probe("keep")
    pages = 2 * 49152 * 576 * 4 // 4096  # two 113 MB tensors a micro-batch
    # glibc's default: fresh mappings every time, nearly every page faulted in again
    assert not default["kept"]
    assert all(f >= 0.9 * pages for f in default["faults"]), default
    # kept: once the heap has grown, the freed pages serve the next micro-batches' tensors
    assert kept["kept"]
    assert kept["faults"][-1] < pages // 100, kept
    assert sum(kept["faults"]) < 0.75 * sum(default["faults"]), (kept, default)
    # after the block, the free memory is given back
    assert kept["resident_inside"] - kept["resident_after"] > 200, kept
