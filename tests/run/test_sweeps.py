"""Sweeps with the real Hydra CLI: a grid, an Optuna search, parallel launchers, the summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, REPO, TINY, cli_env, run_train
from hydra import compose, initialize_config_dir

# A tiny job without the end-of-run extras.
JOB = (*TINY, "eval.comparison.at_end=false", "logging.plots=false")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUT = {"capture_output": True, "text": True, "check": True}


def summarize(sweep: Path, *args: str) -> str:
    cmd = [sys.executable, "scripts/summarize_sweep.py", str(sweep), *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), **OUT).stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/.hydra"))


def test_grid_multirun_writes_a_run_folder_per_job_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ("algorithm.policy_loss.clip_ratio=0.1,0.2", "algorithm.kl.coef=0,0.04")
    run_train("-m", *JOB, *grid, f"hydra.sweep.dir={sweep}")
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        for name in ("summary.json", "metrics.jsonl", "config.yaml", "run_info.json"):
            assert (job / name).is_file(), f"{job.name}/{name}"
        config = yaml.safe_load((job / "config.yaml").read_text())
        algorithm = config["algorithm"]
        seen.add((algorithm["policy_loss"]["clip_ratio"], algorithm["kl"]["coef"]))
    assert seen == set(product([0.1, 0.2], [0, 0.04]))

    table = summarize(sweep)
    assert "ranked by eval/accuracy_strict (maximize)" in table
    assert "| algorithm.kl.coef | algorithm.policy_loss.clip_ratio |" in table
    rows = read_csv(sweep / "summary.csv")
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"]
    assert all(r["status"] == "done" and r["steps"] == "2" for r in rows)
    assert (sweep / "summary.md").read_text() == table
    assert (sweep / "reward_curves.png").read_bytes().startswith(PNG_MAGIC)


def fake_job(sweep: Path, name: str, overrides: list[str], rewards: list[float], **extra) -> Path:
    """A job folder as a run leaves it: overrides, metrics.jsonl, maybe summary and run_info."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("objective: eval/accuracy_strict\n")
    lines = [{"step": s, "rewards/mean": r} for s, r in enumerate(rewards, start=1)]
    if "accuracy" in extra:
        lines[-1]["eval/accuracy_strict"] = extra["accuracy"]
        summary = {"eval/accuracy_strict": extra["accuracy"]}
        summary["before"] = {"eval/accuracy_strict": extra.get("before", 0.0)}
        (job / "summary.json").write_text(json.dumps(summary))
    (job / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if "pid" in extra:
        info = {"host": os.uname().nodename, "pid": extra["pid"], "resumes": []}
        (job / "run_info.json").write_text(json.dumps(info))
    return job


def test_summary_ranks_by_the_objective_and_lists_failed_and_running_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0", ["lr=1", "seed=0"], [0.1, 0.2], accuracy=0.25)
    fake_job(sweep, "1", ["lr=2", "seed=0"], [0.1, 0.5, 0.4], accuracy=0.75)
    fake_job(sweep, "2", ["lr=3", "seed=0"], [0.3], pid=os.getpid())  # alive: this test
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **OUT)
    fake_job(sweep, "3", ["lr=4", "seed=0"], [0.2, 0.9], pid=int(dead.stdout))
    table = summarize(sweep)
    rows = read_csv(sweep / "summary.csv")
    assert [(r["rank"], r["job"], r["status"]) for r in rows] == [
        ("1", "1", "done"),
        ("2", "0", "done"),
        ("3", "2", "running"),
        ("4", "3", "failed"),
    ]
    assert rows[0]["lr"] == "2" and "seed" not in rows[0]  # only the swept keys
    assert rows[0]["rewards/mean final"] == "0.4" and rows[0]["rewards/mean best"] == "0.5"
    assert rows[3]["steps"] == "2" and rows[3]["eval/accuracy_strict final"] == ""
    assert "| 4 | 3 | failed | 2 | 4 |" in table
    summarize(sweep, "--direction", "minimize")
    assert [r["job"] for r in read_csv(sweep / "summary.csv")][:2] == ["0", "1"]
    assert (sweep / "reward_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_summary_averages_over_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0", ["algorithm=grpo", "seed=1"], [0.2, 0.4], accuracy=0.5, before=0.2)
    fake_job(sweep, "1", ["algorithm=grpo", "seed=2"], [0.2, 0.6], accuracy=0.7, before=0.2)
    fake_job(sweep, "2", ["algorithm=dapo", "seed=1"], [0.1, 0.3], accuracy=0.4, before=0.2)
    fake_job(sweep, "3", ["algorithm=dapo", "seed=2"], [0.1], pid=os.getpid())  # not done
    table = summarize(sweep, "--over", "seed")
    means = table.split("mean +- population std over seed")[1]
    assert "| grpo | 1,2 | 0.200 +- 0.000 | 0.600 +- 0.100 | 0.500 +- 0.100 |" in means
    assert "| dapo | 1 | 0.200 +- 0.000 | 0.400 +- 0.000 | 0.300 +- 0.000 |" in means


@pytest.mark.slow
def test_optuna_search_runs_trials_and_continues_from_its_study(tmp_path):
    import optuna

    sweep = tmp_path / "search"
    search = ("hparams_search=optuna", *JOB, f"hydra.sweep.dir={sweep}")
    run_train(*search, "hydra.sweeper.n_trials=2")
    assert len(job_dirs(sweep)) == 2 and (sweep / "optuna.db").is_file()
    run_train(*search, "hydra.sweeper.n_trials=1")  # continue the interrupted search
    study = optuna.load_study(study_name="grpo", storage=f"sqlite:///{sweep}/optuna.db")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert {
        "trainer.learning_rate",
        "algorithm.policy_loss.clip_ratio",
        "algorithm.kl.coef",
    } <= set(trials[0].params)
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    for job in jobs:  # each trial's value is its run's objective
        summary = json.loads((job / "summary.json").read_text())
        config = yaml.safe_load((job / "config.yaml").read_text())
        trial = next(
            t
            for t in trials
            if t.params["algorithm.policy_loss.clip_ratio"]
            == config["algorithm"]["policy_loss"]["clip_ratio"]
        )
        assert trial.value == summary["eval/accuracy_strict"]
    summarize(sweep)
    assert len(read_csv(sweep / "summary.csv")) == 3


def torch_threads(job: Path) -> int:
    return json.loads((job / "run_info.json").read_text())["hardware"]["torch_threads"]


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_with_a_share_of_the_cores_each(tmp_path):
    sweep = tmp_path / "sweep"
    cores = len(os.sched_getaffinity(0))
    env = {**cli_env(), "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    cmd = [sys.executable, "-m", "grpo.train", "-m", "hydra/launcher=joblib"]
    cmd += ["hydra.launcher.n_jobs=2", *JOB, "seed=1,2", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=REPO, env=env, **OUT)
    jobs = job_dirs(sweep)
    assert len(jobs) == 2 and all((j / "summary.json").exists() for j in jobs)
    pids = {json.loads((j / "run_info.json").read_text())["pid"] for j in jobs}
    assert len(pids) == 2  # worker processes, not the launcher's
    assert [torch_threads(j) for j in jobs] == [max(cores // 2, 1)] * 2


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_with_cpus_per_task_threads(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = ("hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1")
    run_train(
        "-m",
        *launcher,
        "hydra.launcher.timeout_min=10",
        *JOB,
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = job_dirs(sweep)
    assert len(jobs) == 2 and all((j / "summary.json").exists() for j in jobs)
    assert [torch_threads(j) for j in jobs] == [1, 1]


def test_slurm_launcher_config_reaches_sbatch(tmp_path):
    """The real plugin renders the sbatch script; stand-ins for `srun`/`sbatch` capture it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    copy = tmp_path / "submitted.sh"
    env = {**cli_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_COPY": str(copy)}
    cmd = [sys.executable, "-m", "grpo.train", "-m", "hydra/launcher=slurm", *JOB]
    cmd += ["hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    script = copy.read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=240", "--cpus-per-task=8"):
        assert f"#SBATCH {line}" in script
    assert "submitit" in script


def test_optuna_search_config_searches_the_four_knobs_into_a_sqlite_study():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert set(sweeper.params) == {
        "trainer.learning_rate",
        "algorithm.policy_loss.clip_ratio",
        "algorithm.kl.coef",
        "algorithm.num_responses_per_prompt",
    }
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"  # in the sweep folder
    assert sweeper.direction == "maximize" and sweeper.n_trials > 0 and cfg.objective
