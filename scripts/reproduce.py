"""Run a finished run again into a new folder and, with --check, compare the two runs' metrics.

    python scripts/reproduce.py RUN_DIR [--out NEW_DIR] [--check] [--tolerance 0]

The new run gets the original's command-line overrides (from RUN_DIR/run_info.json) and its
torch thread count. It first compares the code with the code state the run recorded (git commit
and uncommitted diff) and warns if they differ. --check compares the two metrics.jsonl line by
line, leaving out timing keys (time/*, tokens/s): on CPU with the same code they match exactly.
Exit status: the training's if it failed, else 1 when --check finds a difference, else 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from grpo.run.records import code_differences, code_state, compare_metrics

# Overrides not carried over: a reproduction is a fresh run in its own folder, with the run's
# recorded thread count.
DROPPED = ("trainer.resume=", "trainer.num_threads=", "hydra.run.dir=", "hydra.sweep.dir=")


def reproduce_command(run_dir: Path, out_dir: Path) -> list[str]:
    """`python -m grpo.train` with the run's overrides, into `out_dir`."""
    info = json.loads((run_dir / "run_info.json").read_text())
    overrides = [o for o in info["overrides"] if not o.startswith(DROPPED)]
    return [
        sys.executable,
        "-m",
        "grpo.train",
        *overrides,
        f"trainer.num_threads={info['hardware']['torch_threads']}",
        "hydra.mode=RUN",
        f"hydra.run.dir={out_dir}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (has run_info.json)")
    parser.add_argument("--out", type=Path, help="new run folder (default: RUN_DIR-repro-TIME)")
    parser.add_argument("--check", action="store_true", help="compare the two metrics.jsonl")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed float difference")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    if not (run_dir / "run_info.json").is_file():
        parser.error(f"{run_dir} has no run_info.json: not a run folder")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    out_dir = (args.out or run_dir.with_name(f"{run_dir.name}-repro-{stamp}")).resolve()

    recorded = json.loads((run_dir / "run_info.json").read_text())["code"]
    for note in code_differences(recorded, code_state()):
        print(f"warning: the code differs from the run's: {note}", file=sys.stderr)
    command = reproduce_command(run_dir, out_dir)
    print("running:", " ".join(command), flush=True)
    status = subprocess.run(command).returncode
    if status:
        return status
    print(f"reproduced into {out_dir}")
    if not args.check:
        return 0
    differences = compare_metrics(run_dir, out_dir, args.tolerance)
    if differences:
        print(f"metrics differ ({len(differences)} differences):", *differences[:20], sep="\n  ")
        return 1
    lines = len((out_dir / "metrics.jsonl").read_text().splitlines())
    print(f"metrics match: {lines} lines identical (timing keys left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
