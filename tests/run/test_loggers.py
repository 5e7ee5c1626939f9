"""Logging: real runs of the tiny model through every tracker (wandb offline, TensorBoard,
MLflow, trackio), each read back with the library's own reader (wandb's transaction log,
TensorBoard's EventAccumulator, MLflow's client, trackio's storage); the console logger's fan-out
and resume ids."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
from conftest import compose_config, read_metrics
from hydra.utils import instantiate
from omegaconf import OmegaConf

from grpo.rollout import kernels
from grpo.run.checkpoint import pass_run_id
from grpo.run.loggers import RunLogger
from grpo.run.trackers import MLflowTracker, TensorBoardTracker, Tracker, TrackioTracker

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
    built = kernels.load("few_rows")
    if built is not None:  # keep the lean decoder's kernel builds (torch's folder is under HOME)
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path(built.__file__).parents[1]))
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
        "logging.wandb.project=grpo-tests",
        "logging.wandb.name=tiny-offline",
        "logging.wandb.group=ci",
        "logging.wandb.tags=[tiny,offline]",
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
    home = sealed_env / "home"
    assert not [p for p in home.rglob("*") if "wandb" in str(p.relative_to(home))]
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


# --- TensorBoard, MLflow, trackio, and several trackers at once -----------------------------

# Loaded first by every Python process that has its folder on PYTHONPATH: notes each attempt to
# reach a host other than this one (a DNS lookup or a connection) in $GRPO_TEST_NET_LOG.
NET_HOOK = """
import os, sys

def _grpo_net_hook(event, args, _log=os.environ.get("GRPO_TEST_NET_LOG")):
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    elif event == "socket.getaddrinfo":
        host = args[0]
    else:
        return
    if _log and host not in (None, "", "localhost", "127.0.0.1", "::1", b"localhost"):
        with open(_log, "a") as f:
            f.write(f"{event} {host!r}\\n")

sys.addaudithook(_grpo_net_hook)
"""


def scalar_at(values: list, step: int) -> float:
    (value,) = [v.value for v in values if v.step == step]
    return value


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Subprocesses note every host they try to reach in the returned file."""
    hook = tmp_path / "net_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NET_HOOK)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    log = tmp_path / "net.log"
    monkeypatch.setenv("GRPO_TEST_NET_LOG", str(log))
    # The hook is not blind: a lookup of another host is noted.
    lookup = "import socket\ntry: socket.getaddrinfo('example.invalid', 80)\nexcept OSError: pass"
    subprocess.run([sys.executable, "-c", lookup], check=True, timeout=60)
    assert "example.invalid" in log.read_text()
    log.unlink()
    return log


def test_tensorboard_mlflow_and_trackio_hold_every_metric_of_the_jsonl(
    tiny_run, tmp_path, monkeypatch, no_network
):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    stores = tmp_path / "stores"
    # Remote settings a user may have: trackio must stay local, MLflow must use the config's store.
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/grpo-space")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    # As on a user's machine: MLflow would send telemetry unless told not to (it stays quiet
    # under pytest and CI by itself, so those marks are taken away here).
    for var in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI"):
        monkeypatch.delenv(var, raising=False)
    run_dir, proc = tiny_run(
        "logging=[tensorboard,mlflow,trackio]",
        f"logging.mlflow.tracking_uri=sqlite:///{stores}/mlflow.db",
        f"logging.trackio.dir={stores}/trackio",
        "logging.samples_every=1",
        "eval.comparison.at_end=false",
        "eval.heldout.num_samples=4",
        "logging.plots=false",
    )
    assert not no_network.exists(), no_network.read_text()  # no host but this one, ever
    printed = proc.stdout + proc.stderr
    assert "Trackio" not in printed and "Creating initial MLflow" not in printed  # quiet
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    logged = {key for row in rows for key in row} - {"step"}
    assert not [k for k in SEED_METRICS + DIAGNOSTICS if k not in logged]
    summary = json.loads((run_dir / "summary.json").read_text())
    before = summary["before"]["eval/avg_reward"]

    # TensorBoard: the event files in the run folder, read by TensorBoard's own reader.
    acc = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0}
    )
    acc.Reload()
    for row in rows:
        for key, value in row.items():
            if key != "step":  # event files hold float32
                assert same(scalar_at(acc.Scalars(key), row["step"]), float(np.float32(value))), key
    assert [h.step for h in acc.Histograms("rewards/histogram")] == [1, 2]
    assert acc.Histograms("rewards/histogram")[0].histogram_value.num == 4  # 2 prompts x 2
    assert {e.step for e in acc.Tensors("samples/text_summary")} == {1, 2}
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 2" in config_text
    assert scalar_at(acc.Scalars("summary/before/eval/avg_reward"), 2) == np.float32(before)
    hparams = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        hparams[data.WhichOneof("data")] = data
    start = hparams["session_start_info"].session_start_info.hparams
    assert start["trainer.max_steps"].number_value == 2
    assert start["model.lora.enabled"].string_value == "false"
    metric_names = {m.name.tag for m in hparams["experiment"].experiment.metric_infos}
    assert "summary/after/eval/accuracy_strict" in metric_names

    # MLflow: its client on the SQLite store (the environment's tracking URI did not win).
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from grpo.run.trackers import mlflow_name

    client = MlflowClient(tracking_uri=f"sqlite:///{stores}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("grpo").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["grpo.run_dir"] == str(run_dir.resolve())
    assert run.data.params["trainer.max_steps"] == "2"
    assert run.data.params["model.lora.enabled"] == "false"
    assert mlflow_name("eval/pass@4") == "eval/pass_at_4"
    for key in logged:
        history = {m.step: m.value for m in client.get_metric_history(run_id, mlflow_name(key))}
        for row in rows:
            if key in row:
                assert same(history[row["step"]], row[key]), key
    assert run.data.metrics["summary/before/eval/avg_reward"] == before
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "samples"} <= artifacts
    saved = json.loads(
        Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text()
    )
    assert saved["before"] == summary["before"]
    samples = client.download_artifacts(run_id, "samples/step_000002.json", str(tmp_path))
    assert {"prompt", "completion", "reward"} <= json.loads(Path(samples).read_text())[0].keys()

    # trackio: its own storage, in the configured folder (the Space in the environment ignored).
    from trackio import sqlite_storage

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", stores / "trackio")
    (name,) = sqlite_storage.SQLiteStorage.get_runs("grpo")
    by_step: dict[int, dict] = {}
    for entry in sqlite_storage.SQLiteStorage.get_logs("grpo", name):
        by_step.setdefault(entry["step"], {}).update(entry)
    for row in rows:
        for key, value in row.items():
            assert same(by_step[row["step"]][key], value), key
    assert by_step[1]["samples"]["_type"] == "trackio.table"
    assert by_step[2]["rewards/histogram"]["_type"] == "trackio.histogram"
    assert by_step[2]["summary/before/eval/avg_reward"] == before
    config = sqlite_storage.SQLiteStorage.get_run_config("grpo", name)
    assert config["trainer"]["max_steps"] == 2 and config["run_dir"] == str(run_dir.resolve())


def test_each_tracker_option_adds_its_node_and_several_compose():
    one = compose_config("logging=tensorboard")
    assert one.logging._target_ == "grpo.run.loggers.RunLogger"
    assert one.logging.samples_every == 10 and "tensorboard" in one.logging
    several = compose_config("logging=[wandb,tensorboard,mlflow,trackio]", "debug=tiny")
    assert several.logging.plots is False  # debug=tiny still reaches the console settings
    for name in ("wandb", "tensorboard", "mlflow", "trackio"):
        node = several.logging[name]
        assert node._partial_ is True and node._target_.startswith("grpo.run.trackers.")
    assert several.logging.mlflow.tracking_uri == "sqlite:///outputs/mlflow.db"
    assert several.logging.trackio.dir == "outputs/trackio"
    assert "wandb" not in compose_config().logging  # console: no tracker


class Recorder(Tracker):
    """A tracker that keeps every call."""

    def __init__(self, run_dir, run_config, name: str = "", resume_id=None) -> None:
        self.calls: list[tuple] = [("init", resume_id)]
        self.run_id = f"{name}-id" if name else None

    def log(self, step, metrics):
        self.calls.append(("log", step, dict(metrics)))

    def log_samples(self, step, records, table):
        self.calls.append(("samples", step, len(records), table and len(table)))

    def finish(self, summary):
        self.calls.append(("finish", summary["steps"]))


def test_the_console_logger_fans_every_call_out_to_its_trackers(tmp_path):
    make = functools.partial
    logger = RunLogger(
        tmp_path, 2, {"seed": 1}, progress_bar=False, samples_every=2, num_samples=3, plots=False,
        a=make(Recorder, name="a"), b=make(Recorder),
        resume_id={"a": "a-id", "gone": "x"},
    )  # fmt: skip
    records = [{"prompt": "p", "reward": 1.0} for _ in range(5)]
    for step in (1, 2):
        logger.log(step, {"rewards/mean": 0.5})
        logger.log_samples(step, records)
    logger.finish({"steps": 2})
    expected = [
        ("log", 1, {"rewards/mean": 0.5}),
        ("samples", 1, 5, None),  # every record (histograms); no table: not due
        ("log", 2, {"rewards/mean": 0.5}),
        ("samples", 2, 5, 3),  # due: the first num_samples rows
        ("finish", 2),
    ]
    assert logger.trackers["a"].calls == [("init", "a-id"), *expected]
    assert logger.trackers["b"].calls == [("init", None), *expected]
    assert logger.run_id == {"a": "a-id"}  # kept in checkpoints
    assert len(read_metrics(tmp_path)) == 2  # metrics.jsonl as before
    # A checkpoint of a run from before several trackers holds wandb's id alone.
    old = RunLogger(tmp_path, 1, {}, progress_bar=False, resume_id="w1", wandb=make(Recorder))
    assert old.trackers["wandb"].calls == [("init", "w1")]
    assert RunLogger(tmp_path, 1, {}, progress_bar=False).run_id is None
    with pytest.raises(ValueError, match="logging.oops: not a tracker"):
        RunLogger(tmp_path, 1, {}, progress_bar=False, oops={"project": "x"})


def test_a_checkpoints_run_ids_reach_each_tracker(tmp_path):
    """On resume grpo.run.checkpoint sets `logging.resume_id` from the checkpoint's ids; the
    logger built from that config hands each tracker its own."""
    node = {"_target_": f"{__name__}.Recorder", "_partial_": True}
    logging = {"_target_": "grpo.run.loggers.RunLogger", "progress_bar": False}
    cfg = OmegaConf.create({"logging": {**logging, "a": {**node, "name": "a"}, "b": node}})
    OmegaConf.set_struct(cfg, True)
    pass_run_id(cfg, {"a": "a-7"})
    logger = instantiate(cfg.logging, _partial_=True)(run_dir=tmp_path, max_steps=1, run_config={})
    assert logger.trackers["a"].calls == [("init", "a-7")]
    assert logger.trackers["b"].calls == [("init", None)]


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory):
    """trackio reads its folder once per process, at import (`TRACKIO_DIR`): here, a folder of
    this module's own, however this process imported trackio before."""
    folder = tmp_path_factory.mktemp("trackio")
    patch = pytest.MonkeyPatch()
    patch.setenv("TRACKIO_DIR", str(folder))
    import trackio  # noqa: F401

    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            patch.setattr(module, "TRACKIO_DIR", folder)
    yield folder
    patch.undo()


def test_a_resumed_run_continues_each_trackers_run(tmp_path, monkeypatch, trackio_dir):
    """The run ids of a checkpoint continue the same TensorBoard folder (events after the
    checkpoint dropped), the same MLflow run and the same trackio run."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio import sqlite_storage

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trackers = {
        "tensorboard": functools.partial(TensorBoardTracker, flush_secs=1),
        "mlflow": functools.partial(MLflowTracker, tracking_uri=uri),
        "trackio": functools.partial(TrackioTracker, project="resume-test", dir=str(trackio_dir)),
    }

    def run(steps, resume_id=None, value=0.0):
        logger = RunLogger(tmp_path, 4, {"seed": 1}, progress_bar=False, plots=False,
                           resume_id=resume_id, **trackers)  # fmt: skip
        for step in steps:
            logger.log(step, {"train/total_loss": step + value})
        return logger

    first = run([1, 2, 3])  # killed after step 3; its checkpoint was at step 2
    ids = first.run_id
    first.trackers["tensorboard"].writer.flush()
    second = run([3, 4], resume_id=ids, value=0.5)
    second.finish({"steps": 4})
    assert second.run_id == ids

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/total_loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.5), (4, 4.5)
    ]  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(ids["mlflow"], "train/total_loss")
    assert {(m.step, m.value) for m in history} >= {(1, 1.0), (4, 4.5)}
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    logs = sqlite_storage.SQLiteStorage.get_logs("resume-test", ids["trackio"])
    assert [e["step"] for e in logs if "train/total_loss" in e][-1] == 4
    with pytest.raises(ValueError, match="already imported here"):
        TrackioTracker(tmp_path, {}, dir=str(tmp_path / "elsewhere"))
