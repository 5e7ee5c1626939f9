"""Logging: a real offline wandb run on the tiny model, read back with wandb's own reader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
from conftest import read_metrics

SEED_METRICS = [
    "train/total_loss",
    "train/policy_loss",
    "train/kl_penalty",
    "train/kl_mean",
    "train/kl_std",
    "train/ratio_mean",
    "train/ratio_std",
    "train/advantages_mean",
    "train/advantages_std",
    "rewards/mean",
    "rewards/std",
    "rewards/max",
    "rewards/min",
    "rewards/median",
    "rewards/q25",
    "rewards/q75",
    "group_stats/num_groups",
    "group_stats/avg_group_size",
    "eval/avg_reward",
    "eval/avg_response_length",
    "eval/avg_math_score",
]
DIAGNOSTICS = [
    "rewards/correctness",  # a reward part (the hybrid reward's correctness)
    "group_stats/zero_spread_fraction",
    "train/clip_fraction",
    "completions/mean_length",
    "completions/max_length",
    "completions/truncated_fraction",
    "train/entropy_mean",
    "train/grad_norm",
    "train/param_norm",
    "train/learning_rate",
    "time/tokens_per_s",
    "time/generate_s",
    "time/reward_s",
    "time/logprobs_s",
    "time/advantages_s",
    "time/update_s",
    "eval/accuracy_strict",
    "eval/accuracy_lenient",
    "eval/pass@4",
    "eval/maj@4",
]
FAKE_KEY = "0123456789abcdef" * 2 + "deadbeef"  # 40 characters, like a real wandb key


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb transaction log, via `wandb leet inspect --json`."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def history_by_step(records: list[dict]) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            steps.setdefault(int(item["_step"]), {}).update(item)
    return steps


@pytest.fixture
def sealed_env(tmp_path, monkeypatch):
    """A fake HOME, wandb's own folders inside the run folder, a fake key, no reachable server."""
    cache = os.environ.get("GRPO_CACHE_DIR", str(Path("~/.cache/grpo").expanduser()))
    run_dir = tmp_path / "run"
    monkeypatch.setenv("GRPO_CACHE_DIR", cache)  # keep the tiny model's cache
    monkeypatch.setenv("MPLCONFIGDIR", matplotlib.get_configdir())  # keep matplotlib's font cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var, sub in (("CACHE", "cache"), ("DATA", "data"), ("CONFIG", "config")):
        monkeypatch.setenv(f"WANDB_{var}_DIR", str(run_dir / "wandb" / sub))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path


def test_wandb_offline_run_holds_every_metric_of_the_jsonl(tiny_run, sealed_env):
    run_dir, proc = tiny_run(
        "logging=wandb",
        "logging.project=grpo-tests",
        "logging.name=tiny-offline",
        "logging.group=ci",
        "logging.tags=[tiny,offline]",
        "logging.samples_every=1",
        "eval.comparison.at_end=false",
        "eval.heldout.num_samples=4",
        "logging.plots=false",
    )
    records = wandb_records(run_dir)
    history = history_by_step(records)

    # Every seed name and every diagnostic reaches wandb.
    logged = {key for item in history.values() for key in item}
    missing = [k for k in SEED_METRICS + DIAGNOSTICS if k not in logged]
    assert not missing, f"not in the wandb history: {missing}"

    # The JSONL and wandb hold the same numbers at the same steps.
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert math.isclose(history[row["step"]][key], value, rel_tol=1e-12), key

    # wandb extras: a sample table each step (samples_every=1) and a reward histogram.
    for step in (1, 2):
        assert history[step]["samples._type"] == "table-file"
        assert history[step]["rewards/histogram._type"] == "histogram"
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "ground_truth", "reward", "parts"} <= samples[0].keys()

    # The run: names from the config, the resolved config, offline, inside the run folder.
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["project"], run["display_name"], run["run_group"]) == (
        "grpo-tests",
        "tiny-offline",
        "ci",
    )
    assert run["tags"] == ["tiny", "offline"]
    config = run["config"]["update"]
    assert config["trainer"]["max_steps"] == 2
    assert "${" not in config["model"]["checkpoint"]["cache_dir"]  # an interpolation, resolved
    assert "${" not in json.dumps(config)
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    before = json.loads((run_dir / "summary.json").read_text())["before"]
    assert summary["before"]["eval/avg_reward"] == before["eval/avg_reward"]

    # Nothing outside the run folder; the key in the environment is written nowhere.
    assert [p.name for p in sealed_env.iterdir() if p.name != "home"] == ["run"]
    assert not [p for p in (sealed_env / "home").rglob("*") if "wandb" in str(p)]
    for path in sealed_env.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_console_logging_writes_no_wandb_files(tiny_run):
    run_dir, _ = tiny_run("eval.comparison.at_end=false", "logging.samples_every=2")
    rows = read_metrics(run_dir)
    assert all(k in rows[1] for k in SEED_METRICS if not k.startswith("eval/"))
    assert all(k in rows[-1] for k in SEED_METRICS if k.startswith("eval/"))
    steps = {json.loads(line)["step"] for line in (run_dir / "samples.jsonl").open()}
    assert steps == {2}
    assert not (run_dir / "wandb").exists()
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "completion_length.png",
        "eval_accuracy.png",
        "loss_kl.png",
        "rewards.png",
    ]
