"""Resume with real processes and real kills: the resumed run logs what an uninterrupted one did."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO, TINY, cli_env, run_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from grpo.run.checkpoint import list_checkpoints
from grpo.run.config import ConfigError
from grpo.run.records import check_same_config, compare_metrics, read_metrics

# Long enough to be killed mid-run; periodic evaluation and samples use the RNG between steps.
RUN = (
    *TINY,
    "trainer.max_steps=32",
    "eval.every=4",
    "logging.samples_every=3",
    "eval.comparison.at_end=false",
    "logging.plots=false",
)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    run_train(*RUN, f"hydra.run.dir={run_dir}")
    return run_dir


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The CLI in the background; its stderr goes to `run_dir`.stderr."""
    log = run_dir.with_suffix(".stderr").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "grpo.train", *RUN, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def assert_same_as_whole(run_dir: Path, whole_run: Path) -> None:
    assert compare_metrics(whole_run, run_dir) == []
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 33))  # each step once
    assert (run_dir / "samples.jsonl").read_text() == (whole_run / "samples.jsonl").read_text()


def test_kill9_mid_run_then_resume_ends_with_the_same_metrics(tmp_path, whole_run):
    run_dir = tmp_path / "run"
    process = start(run_dir, "trainer.save_every=4")
    checkpoint = run_dir / "checkpoints" / "step_000008"
    wait_for(checkpoint.exists, process, "checkpoint 8")
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    run_train(*RUN, "trainer.save_every=4", "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert_same_as_whole(run_dir, whole_run)


def test_sigterm_saves_a_checkpoint_and_the_run_continues_from_it(tmp_path, whole_run):
    run_dir = tmp_path / "run"
    process = start(run_dir)  # save_every=0: the only checkpoint is the signal's
    wait_for(lambda: len(read_metrics(run_dir)) >= 4, process, "step 3")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    stderr = run_dir.with_suffix(".stderr").read_text()
    assert "SIGTERM: stopped after step" in stderr and "trainer.resume=auto" in stderr
    (checkpoint,) = list_checkpoints(run_dir)
    assert 3 <= int(checkpoint.name.split("_")[1]) < 32
    proc = run_train(*RUN, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert f"from {checkpoint}" in proc.stderr
    assert_same_as_whole(run_dir, whole_run)


def test_a_fresh_run_into_an_existing_run_folder_is_refused(whole_run):
    before = (whole_run / "metrics.jsonl").read_text()
    proc = run_train(*RUN, f"hydra.run.dir={whole_run}", check=False)
    assert proc.returncode != 0
    assert f"trainer.resume=null: {whole_run} already holds a run" in proc.stderr
    assert (whole_run / "metrics.jsonl").read_text() == before


def test_resuming_with_a_different_config_is_refused(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        original = compose("train", overrides=list(TINY))
        changed = compose("train", overrides=[*TINY, "algorithm.policy_loss.clip_ratio=0.1"])
        longer = compose("train", overrides=[*TINY, "trainer.max_steps=9", "trainer.resume=auto"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(original, resolve=True))
    (tmp_path / "run_info.json").write_text(json.dumps({"overrides": list(TINY)}))
    check_same_config(longer, tmp_path)  # how long it runs may change
    with pytest.raises(
        ConfigError, match=r"algorithm.policy_loss.clip_ratio \(run: 0.2, now: 0.1\)"
    ) as error:
        check_same_config(changed, tmp_path)
    assert str(error.value).endswith(f"Resume with the run's overrides: {' '.join(TINY)}")
