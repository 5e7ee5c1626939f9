"""Run logging. Every logger has the same three calls:

- `log(step, metrics)`: numbers for one step;
- `log_samples(step, records)`: the step's completions (`grpo.run.metrics.sample_records`);
- `finish(summary)`: end of run.

`RunLogger` (`logging=console`) writes `metrics.jsonl` (one JSON object per call), sample
responses to `samples.jsonl` every `samples_every` steps, a progress bar, and PNG plots at the
end, and hands every call on to the experiment trackers the config names (`grpo.run.trackers`:
`logging=wandb`, `tensorboard`, `mlflow`, `trackio`, or several, `logging=[wandb,tensorboard]`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from grpo.run.plots import make_plots
from grpo.run.trackers import Tracker


class RunLogger:
    """Writes every logged number to `run_dir/metrics.jsonl`, shows a progress bar, and fans
    each call out to its trackers.

    `trackers` are the config's `logging.<name>` nodes (`_partial_: true`), each built here
    with the run folder, the resolved config (`run_config`) and, when the run resumes, its
    `resume_id` (the tracker's run id from the checkpoint). `run_id` is those ids by tracker
    name (None without trackers): grpo.run.checkpoint keeps it and passes it back.
    """

    def __init__(
        self,
        run_dir: str | Path,
        max_steps: int,
        run_config: dict[str, Any],
        progress_bar: bool = True,
        samples_every: int = 10,
        num_samples: int = 8,
        plots: bool = True,
        resume_id: dict[str, str] | str | None = None,
        **trackers: Callable[..., Tracker],
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_every = samples_every
        self.num_samples = num_samples
        self.plots = plots
        if isinstance(resume_id, str):  # a checkpoint from before several trackers: wandb's
            resume_id = {"wandb": resume_id}
        ids = dict(resume_id or {})
        self.trackers: dict[str, Tracker] = {}
        for name, make in trackers.items():
            if not callable(make):
                raise ValueError(
                    f"logging.{name}: not a tracker (a node with _target_ and _partial_: true, "
                    "as in conf/logging/*.yaml)"
                )
            extra = {"resume_id": ids[name]} if name in ids else {}
            self.trackers[name] = make(run_dir=self.run_dir, run_config=run_config, **extra)
        self.bar = tqdm(total=max_steps, desc="grpo", disable=not progress_bar, dynamic_ncols=True)

    @property
    def run_id(self) -> dict[str, str] | None:
        """Each tracker's run id by name (those that have one); None when there are none."""
        ids = {name: t.run_id for name, t in self.trackers.items() if t.run_id is not None}
        return ids or None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line `{"step": step, **metrics}`, advance the bar, hand on the numbers."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        if "train/total_loss" in metrics:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                reward=f"{metrics.get('rewards/mean', math.nan):.3f}",
                loss=f"{metrics['train/total_loss']:.4f}",
                s_step=f"{metrics.get('time/step_s', math.nan):.1f}",
            )
            if self.bar.n >= self.bar.total:
                self.bar.close()  # before the end-of-run tables are printed
        for tracker in self.trackers.values():
            tracker.log(step, metrics)

    def samples_due(self, step: int) -> bool:
        """Whether this step's sample responses are written (every `samples_every` steps)."""
        return self.samples_every > 0 and step % self.samples_every == 0

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Append the first `num_samples` records to `samples.jsonl` when due; the trackers get
        every record and, when due, those rows for a table."""
        table = records[: self.num_samples] if self.samples_due(step) else None
        if table is not None:
            with (self.run_dir / "samples.jsonl").open("a") as f:
                for record in table:
                    f.write(json.dumps({"step": step, **record}) + "\n")
        for tracker in self.trackers.values():
            tracker.log_samples(step, records, table)

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the bar, draw the plots into `run_dir/plots/`, finish each tracker."""
        self.bar.close()
        if self.plots and self.path.exists():
            make_plots(self.run_dir)
        for tracker in self.trackers.values():
            tracker.finish(summary)


class NullLogger:
    """The logger of ranks other than 0: takes every call, writes nothing."""

    run_id = None

    def __init__(self, **_: Any) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass
