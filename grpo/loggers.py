"""Run logging: metrics.jsonl in the run folder (one JSON object per step) and a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    """Writes every logged number to `run_dir/metrics.jsonl` and shows a progress bar."""

    def __init__(
        self,
        run_dir: str | Path,
        max_steps: int,
        run_config: dict[str, Any],
        progress_bar: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
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

    def close(self) -> None:
        self.bar.close()
