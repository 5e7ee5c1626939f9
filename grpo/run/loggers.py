"""Run logging. Every logger has the same three calls:

- `log(step, metrics)`: numbers for one step;
- `log_samples(step, records)`: the step's completions (`grpo.run.metrics.sample_records`);
- `finish(summary)`: end of run.

`RunLogger` (`logging=console`) writes `metrics.jsonl` (one JSON object per call), sample
responses to `samples.jsonl` every `samples_every` steps, a progress bar, and PNG plots at the
end. `WandbLogger` (`logging=wandb`) does all of that and sends the same numbers to a wandb run,
plus a table of sample responses, reward histograms and the summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from grpo.run.plots import make_plots


class RunLogger:
    """Writes every logged number to `run_dir/metrics.jsonl` and shows a progress bar.

    `run_config` (the resolved config) is taken by every logger; this one leaves it to Hydra's
    `.hydra/config.yaml`.
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
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_every = samples_every
        self.num_samples = num_samples
        self.plots = plots
        self.bar = tqdm(total=max_steps, desc="grpo", disable=not progress_bar, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line `{"step": step, **metrics}` and advance the bar."""
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

    def samples_due(self, step: int) -> bool:
        """Whether this step's sample responses are written (every `samples_every` steps)."""
        return self.samples_every > 0 and step % self.samples_every == 0

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """Append the first `num_samples` records to `samples.jsonl` when due."""
        if self.samples_due(step):
            with (self.run_dir / "samples.jsonl").open("a") as f:
                for record in records[: self.num_samples]:
                    f.write(json.dumps({"step": step, **record}) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the bar and draw the plots into `run_dir/plots/`."""
        self.bar.close()
        if self.plots and self.path.exists():
            make_plots(self.run_dir)


class WandbLogger(RunLogger):
    """`RunLogger` plus a wandb run in `run_dir/wandb/` (offline by default: `wandb sync` later).

    The run gets the resolved config; the same numbers as metrics.jsonl at the same steps; a
    `samples` table when samples are due; a `rewards/histogram` every step; the summary at the
    end. No credentials are passed or stored: online mode uses the user's own `wandb login`.
    `resume_id` (set by grpo.run.checkpoint when a run resumes) continues that wandb run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        max_steps: int,
        run_config: dict[str, Any],
        project: str = "grpo",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        mode: str = "offline",
        entity: str | None = None,
        resume_id: str | None = None,
        **console: Any,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.mode={mode!r}: must be offline, online or disabled")
        super().__init__(run_dir, max_steps, run_config, **console)
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags),
            mode=mode,
            dir=str(self.run_dir),
            config=run_config,
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        self.run_id = self.run.id  # kept in checkpoints; a resumed run continues this one

    def log(self, step: int, metrics: dict[str, float]) -> None:
        super().log(step, metrics)
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        super().log_samples(step, records)
        data: dict[str, Any] = {
            "rewards/histogram": self.wandb.Histogram([r["reward"] for r in records])
        }
        if self.samples_due(step):
            rows = records[: self.num_samples]
            parts = sorted({p for r in rows for p in r["parts"]})
            columns = ["prompt", "completion", "ground_truth", "reward", "advantage"]
            data["samples"] = self.wandb.Table(
                columns=columns + [f"reward/{p}" for p in parts],
                data=[[r[c] for c in columns] + [r["parts"].get(p) for p in parts] for r in rows],
            )
        self.run.log(data, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        super().finish(summary)
        self.run.summary.update(summary)
        self.run.finish()


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
