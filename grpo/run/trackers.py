"""Experiment trackers behind the console logger: `logging=wandb|tensorboard|mlflow|trackio`, or
several at once, `logging=[wandb,tensorboard]` (each option adds its node, `logging.<name>`).

`grpo.run.loggers.RunLogger` builds each tracker with the run folder and the resolved config and
hands it the same calls it gets. Every tracker records:
- each step's numbers under the names of metrics.jsonl, at the same steps (MLflow's names cannot
  hold `@`: `eval/pass@4` is `eval/pass_at_4` there);
- the resolved config as hyperparameters (dotted keys: `algorithm.kl.coef`);
- sample completions when they are due (`logging.samples_every`);
- the summary at the end (summary.json's numbers as `summary/before/eval/...`,
  `summary/after/...`; wandb keeps it nested in its run summary).

All of them write locally and contact no server unless configured to: wandb offline
(`wandb sync` later); TensorBoard event files in the run folder; MLflow in a SQLite database
under outputs/ (telemetry off); trackio in its SQLite files under outputs/ (its Hugging Face
Space and server settings from the environment are ignored; no dashboard is launched). A tracker
that can continue its run on resume takes `resume_id` (its `run_id` is kept in checkpoints).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MLFLOW_NAME = re.compile(r"[^/\w.\- :]")  # what MLflow refuses in a metric or parameter name


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def hyperparameters(run_config: dict[str, Any]) -> dict[str, int | float | str]:
    """The resolved config as flat hyperparameters: numbers and text stay as they are;
    booleans, null and lists become their JSON text (`true`, `null`, `["q_proj", "v_proj"]`)."""
    return {
        key: value
        if isinstance(value, (int, float, str)) and not isinstance(value, bool)
        else json.dumps(value)
        for key, value in flatten(run_config).items()
    }


def summary_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers as `summary/<path>` (`summary/before/eval/avg_reward`), the
    top-level copies of `after` left out."""
    nested = {k: v for k, v in summary.items() if isinstance(v, dict) or k == "steps"}
    return {
        f"summary/{key.replace('.', '/')}": float(value)
        for key, value in flatten(nested).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Sample completions as a markdown table (prompt, completion, truth, reward, advantage)."""
    columns = ["prompt", "completion", "ground_truth", "reward", "advantage"]

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """What a library prints to stdout is dropped (its warnings and errors still show)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class Tracker:
    """One experiment tracker: what `RunLogger` hands on. `run_id` (or None) is kept in
    checkpoints and given back as `resume_id` when the run resumes."""

    run_id: str | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """The step's numbers, as metrics.jsonl has them."""

    def log_samples(
        self, step: int, records: list[dict[str, Any]], table: list[dict[str, Any]] | None
    ) -> None:
        """Every completion of the step (`records`); `table`: the rows to show when samples are
        due this step, else None."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The end of the run: the summary (summary.json's content), then close."""


class WandbTracker(Tracker):
    """A wandb run in `run_dir/wandb/` (offline by default: `wandb sync` later).

    The run gets the resolved config; the same numbers as metrics.jsonl at the same steps; a
    `samples` table when samples are due; a `rewards/histogram` every step; the summary at the
    end. No credentials are passed or stored: online mode uses the user's own `wandb login`.
    `resume_id` continues that wandb run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict[str, Any],
        project: str = "grpo",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        mode: str = "offline",
        entity: str | None = None,
        resume_id: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb.mode={mode!r}: must be offline, online or disabled")
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags),
            mode=mode,
            dir=str(run_dir),
            config=run_config,
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step, records, table) -> None:
        data: dict[str, Any] = {
            "rewards/histogram": self.wandb.Histogram([r["reward"] for r in records])
        }
        if table is not None:
            parts = sorted({p for r in table for p in r["parts"]})
            columns = ["prompt", "completion", "ground_truth", "reward", "advantage"]
            data["samples"] = self.wandb.Table(
                columns=columns + [f"reward/{p}" for p in parts],
                data=[[r[c] for c in columns] + [r["parts"].get(p) for p in parts] for r in table],
            )
        self.run.log(data, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)
        self.run.finish()


class TensorBoardTracker(Tracker):
    """TensorBoard event files in `log_dir` (default `run_dir/tensorboard`), through torch's
    `SummaryWriter`: `tensorboard --logdir outputs/` (or `multirun/`) shows every run.

    Scalars under the metrics.jsonl names; the config as YAML text (`config`, step 0) and, at the
    end, as hyperparameters with the summary's numbers as their metrics (the HPARAMS tab);
    `rewards/histogram` every step; sample completions as a markdown table (`samples`, TEXT tab).
    A resumed run drops the events it had written after its checkpoint (`purge_step`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict[str, Any],
        log_dir: str | None = None,
        histograms: bool = True,
        flush_secs: int = 30,
        resume_id: str | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir) if log_dir else Path(run_dir) / "tensorboard"
        self.run_config = run_config
        self.histograms = histograms
        self.run_id = str(self.log_dir)
        self._make = lambda purge: SummaryWriter(
            str(self.log_dir), purge_step=purge, flush_secs=flush_secs
        )
        self.writer = None
        if resume_id is None:  # a resumed run makes its writer at its first step (purge_step)
            self.writer = self._make(None)
            text = OmegaConf.to_yaml(run_config)
            self.writer.add_text("config", "```\n" + text + "```", global_step=0)

    def _writer(self, step: int):
        if self.writer is None:
            self.writer = self._make(step)
        return self.writer

    def log(self, step: int, metrics: dict[str, float]) -> None:
        writer = self._writer(step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)

    def log_samples(self, step, records, table) -> None:
        writer = self._writer(step)
        if self.histograms and records:
            import numpy as np

            rewards = np.array([r["reward"] for r in records], dtype=np.float64)
            writer.add_histogram("rewards/histogram", rewards, global_step=step)
        if table is not None:
            writer.add_text("samples", markdown_table(table), global_step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self._writer(int(summary.get("steps", 0)))
        numbers = summary_numbers(summary)
        for part in hparams(hyperparameters(self.run_config), numbers):
            writer.file_writer.add_summary(part)
        for key, value in numbers.items():
            writer.add_scalar(key, value, global_step=int(summary.get("steps", 0)))
        writer.close()


def mlflow_name(key: str) -> str:
    """A metric or parameter name as MLflow takes it: `@` is `_at_`, other refused characters
    `_`."""
    return MLFLOW_NAME.sub("_", key.replace("@", "_at_"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created), for processes that share one database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MLflowTracker(Tracker):
    """An MLflow run (MLflow's client, `mlflow-skinny`) in `tracking_uri`'s store.

    The default store is a SQLite database under outputs/ shared by every run and sweep
    (browse it with MLflow's server, the full `mlflow` package: `mlflow ui --backend-store-uri
    sqlite:///outputs/mlflow.db`; the client reads it as it is); MLflow 3.18 refuses its old
    file store without `MLFLOW_ALLOW_FILE_STORE=true`, so a local store is a database. A server
    (`http://HOST:5000`) works the same. Artifacts (config.yaml, summary.json, sample tables)
    go beside a local database (`mlartifacts/`) unless `artifact_location` says otherwise.
    MLflow's telemetry is turned off (`MLFLOW_DISABLE_TELEMETRY`, unless the environment sets
    it). Parameters: the resolved config (dotted keys, values as text); metrics: the
    metrics.jsonl names (`@` -> `_at_`) at their steps; the summary's numbers at the last step.
    """

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict[str, Any],
        tracking_uri: str = "sqlite:///outputs/mlflow.db",
        experiment: str = "grpo",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        resume_id: str | None = None,
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        database = (
            Path(tracking_uri.removeprefix("sqlite:///"))
            if tracking_uri.startswith("sqlite:///")
            else None
        )
        if artifact_location is None and database is not None:
            artifact_location = (database.parent / "mlartifacts").resolve().as_uri()
        # Creating the database's tables logs at INFO; runs of a sweep may start together.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        lock = _file_lock(database.with_name(database.name + ".lock")) if database else None
        with lock or contextlib.nullcontext():
            if database is not None:
                database.parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
        if resume_id is not None:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return
        run = self.client.create_run(
            experiment_id,
            run_name=run_name,
            tags={"grpo.run_dir": str(Path(run_dir).resolve()), **(tags or {})},
        )
        self.run_id = run.info.run_id
        params = [
            Param(mlflow_name(k), str(v)[:6000]) for k, v in hyperparameters(run_config).items()
        ]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.note.content", _note(run_dir))])
        self.client.log_dict(self.run_id, run_config, "config.yaml")

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_name(k), float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow takes 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    def log_samples(self, step, records, table) -> None:
        if table is not None:
            self.client.log_dict(self.run_id, table, f"samples/step_{step:06d}.json")

    def finish(self, summary: dict[str, Any]) -> None:
        self._log(int(summary.get("steps", 0)), summary_numbers(summary))
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, "FINISHED")


def _note(run_dir: str | Path) -> str:
    return f"grpo run folder: {Path(run_dir).resolve()}"


class TrackioTracker(Tracker):
    """A trackio run (Hugging Face's local-first tracker), stored in `dir` (trackio's
    `TRACKIO_DIR`: one SQLite file per project; default `outputs/trackio`): view it with
    `TRACKIO_DIR=outputs/trackio trackio show --project grpo`.

    Local only: no Hugging Face Space or server (`TRACKIO_SPACE_ID` and `TRACKIO_SERVER_URL` in
    the environment are ignored), no dashboard launched, no CPU/GPU monitor threads; what
    trackio prints is dropped. The run gets the config; the same numbers at the same steps;
    `rewards/histogram` every step and a `samples` table when due; the summary's numbers at the
    last step. `trackio.init` reads `TRACKIO_DIR` at import: a process that imported trackio
    with another folder cannot switch (an error says so). A resumed run continues by name.
    """

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict[str, Any],
        project: str = "grpo",
        name: str | None = None,
        group: str | None = None,
        dir: str = "outputs/trackio",
        resume_id: str | None = None,
    ) -> None:
        folder = Path(dir).expanduser().resolve()
        if "trackio" in sys.modules:
            now = Path(sys.modules["trackio"].utils.TRACKIO_DIR).resolve()
            if now != folder:
                raise ValueError(
                    f"logging.trackio.dir={dir}: trackio was already imported here with "
                    f"TRACKIO_DIR={now} (it reads the folder once, at import)"
                )
        os.environ["TRACKIO_DIR"] = str(folder)
        for remote in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):  # local only
            os.environ.pop(remote, None)
        folder.mkdir(parents=True, exist_ok=True)
        with quiet():
            import trackio

            self.trackio = trackio
            self.run = trackio.init(
                project=project,
                name=resume_id or name,
                group=group,
                config={**run_config, "run_dir": str(Path(run_dir).resolve())},
                resume="allow" if resume_id else "never",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        self.project = project
        self.run_id = self.run.name

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def log_samples(self, step, records, table) -> None:
        data: dict[str, Any] = {}
        if records:
            data["rewards/histogram"] = self.trackio.Histogram([r["reward"] for r in records])
        if table is not None:
            columns = ["prompt", "completion", "ground_truth", "reward", "advantage"]
            data["samples"] = self.trackio.Table(
                columns=columns, data=[[r[c] for c in columns] for r in table]
            )
        if data:
            self.run.log(data, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        numbers = summary_numbers(summary)
        self.run.log(
            {k: v for k, v in numbers.items() if math.isfinite(v)},
            step=int(summary.get("steps", 0)),
        )
        with quiet():
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.finish()  # also clears trackio's current run (no second finish)
            else:
                self.run.finish()
