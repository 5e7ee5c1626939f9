"""Shared test helpers: the repo paths, the local GSM8K copy, and running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
CONF_DIR = REPO / "conf"


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one torch thread, offline, quiet."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_train(*overrides: str, cwd: Path = REPO, check: bool = True, timeout: int = 600):
    """Run `python -m grpo.train OVERRIDES` for real; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "grpo.train", *overrides]
    proc = subprocess.run(
        cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl as a list of dicts."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Overrides that make a tiny CLI run fast: a small model, few steps, short completions.
TINY = (
    "model=tiny",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "algorithm.num_responses_per_prompt=2",
    "trainer.micro_batch_size=4",
    "trainer.max_new_tokens=8",
    "data.num_train=32",
    "data.num_test=4",
    "logging.progress_bar=false",
)


@pytest.fixture
def tiny_run(tmp_path):
    """Run the CLI on the tiny model into a fresh folder; returns (run_dir, process)."""

    def run(*overrides: str, check: bool = True):
        run_dir = tmp_path / "run"
        proc = run_train(*TINY, f"hydra.run.dir={run_dir}", *overrides, check=check)
        return run_dir, proc

    return run
