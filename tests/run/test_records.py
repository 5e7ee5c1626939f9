"""Run folders record how they were made, and `scripts/reproduce.py` runs them again exactly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, cli_env, run_train

from grpo.run.records import code_differences, compare_metrics

RUN = (*TINY, "trainer.max_steps=3", "eval.comparison.at_end=false", "logging.plots=false")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("original") / "run"
    run_train(*RUN, "seed=5", f"hydra.run.dir={run_dir}")
    return run_dir


def test_run_folder_records_config_code_packages_seed_and_hardware(run_dir):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["seed"] == 5 and config["trainer"]["max_steps"] == 3
    assert "${" not in config["model"]["checkpoint"]["cache_dir"]  # resolved
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 5
    assert info["overrides"] == [*RUN, "seed=5"]
    git_head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    assert info["code"]["commit"] == git_head.stdout.strip()
    diff = (run_dir / "git.diff").read_text()  # uncommitted changes: its hash is recorded
    assert info["code"]["diff_sha256"] == (
        hashlib.sha256(diff.encode()).hexdigest() if diff else None
    )
    hardware = info["hardware"]
    assert hardware["torch_threads"] == 1 and hardware["cpu_count"] >= 1  # OMP_NUM_THREADS=1
    import torch

    assert f"torch=={torch.__version__}" in (run_dir / "packages.txt").read_text().splitlines()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()


def test_reproduce_check_runs_again_and_the_metrics_match(run_dir, tmp_path):
    out = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", str(run_dir), "--out", str(out), "--check"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "metrics match: 3 lines identical" in proc.stdout  # max_steps=3: one line per step
    again = json.loads((out / "run_info.json").read_text())
    assert "seed=5" in again["overrides"] and "trainer.num_threads=1" in again["overrides"]


def write_metrics(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_metrics_ignores_timing_and_reports_other_differences(tmp_path):
    a = write_metrics(tmp_path / "a", [{"step": 1, "loss": 0.5, "time/step_s": 1.0}])
    same = write_metrics(tmp_path / "b", [{"step": 1, "loss": 0.5, "time/step_s": 9.0}])
    other = write_metrics(tmp_path / "c", [{"step": 1, "loss": 0.25, "time/step_s": 1.0}])
    longer = write_metrics(tmp_path / "d", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    assert compare_metrics(a, same) == []
    assert compare_metrics(a, other) == ["line 1 (step 1): loss 0.5 vs 0.25"]
    assert compare_metrics(a, other, tolerance=0.3) == []
    assert compare_metrics(a, longer) == ["1 lines vs 2 lines"]


def test_code_differences_name_the_commit_and_the_diff():
    run = {"commit": "abc", "diff_sha256": "1"}
    assert code_differences(run, dict(run)) == []
    notes = code_differences(run, {"commit": "def", "diff_sha256": "2"})
    assert notes[0] == "git commit abc then, def now" and "uncommitted changes differ" in notes[1]
