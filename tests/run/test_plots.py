"""Plots: valid, non-empty PNGs from a metrics.jsonl, also with metrics missing or repeated."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import matplotlib.image
import numpy as np

from grpo.run.plots import make_plots, read_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, steps: int, kl: bool = True, eval_every: int = 5) -> None:
    """A metrics.jsonl shaped like a training run's: step 0 eval, then train rows."""
    evals = {"eval/accuracy_strict": 0.1, "eval/accuracy_lenient": 0.2, "eval/pass@4": 0.4}
    lines = [{"step": 0, **evals}]
    for step in range(1, steps + 1):
        mean = 0.3 + 0.4 * step / steps + 0.05 * math.sin(step)
        row = {
            "step": step,
            "rewards/mean": mean,
            "rewards/min": mean - 0.3,
            "rewards/max": mean + 0.3,
            "rewards/q25": mean - 0.1,
            "rewards/q75": mean + 0.1,
            "train/total_loss": 0.01 * step,
            "train/policy_loss": 0.0,
            "completions/mean_length": 40 - step,
            "completions/max_length": 64,
            "completions/truncated_fraction": 0.5 / step,
        }
        if kl:
            row |= {"train/kl_penalty": 0.01 * step, "train/kl_mean": 0.25 * step}
        if step % eval_every == 0:
            row |= {k: v + step / 100 for k, v in evals.items()}
        lines.append(row)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert width >= 600 and height >= 400, (path, width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert np.std(pixels[..., :3]) > 0.01, f"{path} is blank"


def colored_fraction(path: Path) -> float:
    """The share of pixels in colour (curves and bands; axes and text are black or grey)."""
    rgb = matplotlib.image.imread(path)[..., :3]
    return float(((rgb.max(-1) - rgb.min(-1)) > 0.2).mean())


def test_every_plot_is_a_valid_non_empty_png(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", steps=30)
    paths = make_plots(tmp_path)
    assert [p.name for p in paths] == [
        "rewards.png",
        "loss_kl.png",
        "completion_length.png",
        "eval_accuracy.png",
    ]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_valid_png(path)
        assert colored_fraction(path) > 0.002, f"{path} has no curves"


def test_plots_without_kl_or_eval_still_render(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", steps=3, kl=False, eval_every=100)
    for path in make_plots(tmp_path):
        assert_valid_png(path)


def test_a_later_line_for_a_step_wins(tmp_path):
    """After a resume, steps after the last checkpoint are logged again; the last value counts."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "rewards/mean": 0.1, "eval/pass@4": 0.5}\n'
        '{"step": 2, "rewards/mean": 0.2}\n'
        '{"step": 2, "rewards/mean": 0.3}\n'
    )
    assert read_steps(path) == {
        1: {"rewards/mean": 0.1, "eval/pass@4": 0.5},
        2: {"rewards/mean": 0.3},
    }
