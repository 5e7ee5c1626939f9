"""Run a Python file in the sandbox and print exactly what the model would read.

    python scripts/sandbox.py FILE.py [--wall-seconds 10 --memory-mb 1024 ...] [-v]

Exits 0 whatever the snippet did; -v adds how it ended and the layers in force, on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from grpo.tools.sandbox import Sandbox, SandboxLimits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the Python file to run")
    for field in dataclasses.fields(SandboxLimits):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(default), default=default, help=f"(default {default})")
    parser.add_argument("-v", "--verbose", action="store_true", help="outcome and layers, stderr")
    args = parser.parse_args(argv)
    names = [field.name for field in dataclasses.fields(SandboxLimits)]
    limits = SandboxLimits(**{name: getattr(args, name) for name in names})
    with Sandbox(limits) as sandbox:
        result = sandbox.run(args.file.read_text())
        layers = sorted(sandbox.layers)
    sys.stdout.write(result.text)
    sys.stdout.flush()
    if args.verbose:
        print(
            f"\n--- exit code {result.exit_code}, signal {result.signal}, limit {result.limit}, "
            f"{result.seconds:.3f} s; layers: {' '.join(layers)}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
