"""PNG plots of a run from its `metrics.jsonl`: `python -m grpo.run.plots RUN_DIR` remakes them.

Four figures in `RUN_DIR/plots/`, each readable on its own:
- `rewards.png`: training reward mean per step, with the batch's min-max and q25-q75 bands;
- `loss_kl.png`: total and policy loss, and the KL to the reference (mean over tokens);
- `completion_length.png`: completion length mean and max, and the fraction truncated;
- `eval_accuracy.png`: held-out accuracies (greedy strict / lenient, pass@k, maj@k), with the
  evaluation before training (summary.json) at step 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

Series = tuple[list[int], list[float]]


def read_steps(path: Path) -> dict[int, dict[str, float]]:
    """Metrics by step from a metrics.jsonl; a later line for the same step wins (resumes)."""
    steps: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            steps.setdefault(row.pop("step"), {}).update(row)
    return dict(sorted(steps.items()))


def series(steps: dict[int, dict[str, float]], key: str) -> Series:
    """The steps where `key` was logged, and its values."""
    points = [(s, m[key]) for s, m in steps.items() if isinstance(m.get(key), int | float)]
    return [s for s, _ in points], [float(v) for _, v in points]


def _finish(fig: plt.Figure, axes: list[Axes], title: str, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("training step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)


def plot_rewards(steps: dict[int, dict[str, float]], path: Path, name: str) -> Path:
    """Reward mean per step, shaded min-max (light) and q25-q75 (darker)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x, mean = series(steps, "rewards/mean")
    if x:
        for low, high, alpha, label in (
            ("min", "max", 0.15, "min-max of the batch"),
            ("q25", "q75", 0.3, "q25-q75"),
        ):
            band = series(steps, f"rewards/{low}")[1], series(steps, f"rewards/{high}")[1]
            ax.fill_between(x, *band, alpha=alpha, color="C0", label=label)
        ax.plot(x, mean, color="C0", marker="." if len(x) < 50 else None, label="mean")
    else:
        _no_data(ax, "reward")
    ax.set_ylabel("reward per completion")
    return _finish(fig, [ax], f"Training reward ({name})", path)


def plot_loss_kl(steps: dict[int, dict[str, float]], path: Path, name: str) -> Path:
    """Total loss and its terms (top); mean per-token KL to the reference (bottom)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    terms = (  # the total drawn wide underneath, so terms that equal it stay visible
        (
            "train/total_loss",
            "total loss",
            dict(color="k", lw=4, alpha=0.3),
        ),
        ("train/policy_loss", "policy loss (clipped surrogate)", dict(color="C1", ls="--")),
        ("train/kl_penalty", "KL penalty (beta * KL)", dict(color="C2", ls=":", lw=2)),
    )
    for key, label, style in terms:
        x, y = series(steps, key)
        if x:
            top.plot(x, y, label=label, **style)
    top.set_ylabel("loss")
    x, kl = series(steps, "train/kl_mean")
    if x:
        bottom.plot(x, kl, color="C2", label="KL(policy || reference), k3, token mean")
    else:
        _no_data(bottom, "KL (algorithm.kl.coef=0?)")
    bottom.set_ylabel("KL")
    return _finish(fig, [top, bottom], f"Loss and KL ({name})", path)


def plot_lengths(steps: dict[int, dict[str, float]], path: Path, name: str) -> Path:
    """Completion length mean and max (top); fraction cut at max_new_tokens (bottom)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("completions/mean_length", "mean"), ("completions/max_length", "max")):
        x, y = series(steps, key)
        if x:
            top.plot(x, y, label=label)
    top.set_ylabel("completion length (tokens)")
    x, y = series(steps, "completions/truncated_fraction")
    if x:
        bottom.plot(x, y, color="C3", label="truncated (hit max_new_tokens)")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("fraction")
    return _finish(fig, [top, bottom], f"Completion length ({name})", path)


# Greedy accuracies in the order drawn, with their legend labels (see grpo.evaluation.heldout).
EVAL_GREEDY = {
    "accuracy_strict": "greedy, strict (#### N)",
    "accuracy_lenient": "greedy, lenient (fallbacks)",
    "accuracy_anywhere": "greedy, answer anywhere",
}


def plot_eval(steps: dict[int, dict[str, float]], path: Path, name: str) -> Path:
    """Held-out accuracies: greedy (solid lines) and from samples (dashed), distinct markers."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = {k.removeprefix("eval/") for m in steps.values() for k in m if k.startswith("eval/")}
    greedy = [k for k in EVAL_GREEDY if k in keys]
    sampled = sorted(k for k in keys if k.startswith(("pass@", "maj@")))
    shown = [(k, EVAL_GREEDY[k], "-") for k in greedy] + [
        (k, k + " (sampled)", "--") for k in sampled
    ]
    for i, (key, label, style) in enumerate(shown):
        x, y = series(steps, f"eval/{key}")
        ax.plot(x, y, style, marker="osD^vP*X"[i % 8], markersize=7 - 0.6 * i, label=label)
    if not shown:
        _no_data(ax, "evaluation")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("fraction of held-out problems")
    return _finish(fig, [ax], f"Held-out accuracy ({name})", path)


def make_plots(run_dir: str | Path) -> list[Path]:
    """Draw every figure from `run_dir/metrics.jsonl` into `run_dir/plots/`; return the paths."""
    run_dir = Path(run_dir)
    steps = read_steps(run_dir / "metrics.jsonl")
    summary = run_dir / "summary.json"
    if summary.exists():  # the evaluation before training is drawn at step 0
        steps = {0: json.loads(summary.read_text()).get("before", {}), **steps}
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    name = "/".join(run_dir.resolve().parts[-2:])
    return [
        plot_rewards(steps, out / "rewards.png", name),
        plot_loss_kl(steps, out / "loss_kl.png", name),
        plot_lengths(steps, out / "completion_length.png", name),
        plot_eval(steps, out / "eval_accuracy.png", name),
    ]


if __name__ == "__main__":
    for written in make_plots(sys.argv[1]):
        print(written)
