"""Sandbox throughput: snippets per second for a trivial snippet, with one caller and with two
concurrent callers (a thread and a Sandbox each), the median of several repeats.

    python scripts/bench_sandbox.py [--snippets 300] [--repeats 3] [--code "print(1)"]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from grpo.tools.sandbox import Sandbox  # noqa: E402


def rate(boxes: list[Sandbox], code: str, snippets: int) -> float:
    """Snippets per second when each sandbox runs its share of `snippets` in its own thread."""
    share = snippets // len(boxes)
    failed = []

    def work(box: Sandbox) -> None:
        failed.extend(r.text for r in (box.run(code) for _ in range(share)) if not r.ok)

    threads = [threading.Thread(target=work, args=(box,)) for box in boxes]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failed:
        raise SystemExit(f"{len(failed)} snippets failed, the first: {failed[0]!r}")
    return share * len(boxes) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snippets", type=int, default=300, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", default="print(1)")
    args = parser.parse_args()
    boxes = [Sandbox(), Sandbox()]
    try:
        for box in boxes:
            rate([box], args.code, 20)  # warm up
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"layers: {' '.join(sorted(boxes[0].layers))}")
        for callers in (1, 2):
            runs = [rate(boxes[:callers], args.code, args.snippets) for _ in range(args.repeats)]
            shown = ", ".join(f"{r:.0f}" for r in runs)
            print(f"{callers} caller(s): {statistics.median(runs):.0f} snippets/s (runs: {shown})")
    finally:
        for box in boxes:
            box.close()


if __name__ == "__main__":
    main()
