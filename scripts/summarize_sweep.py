"""Summarise a sweep: one row per job, ranked by the objective, and the jobs' reward curves.

    python scripts/summarize_sweep.py MULTIRUN_DIR [--objective KEY] [--direction maximize|minimize]

Every folder under MULTIRUN_DIR with a `.hydra/` is a job. Its row holds the overrides that vary
between jobs, its status (done; running: its process is alive on this host; failed otherwise),
the last step logged, and the final and best values of the objective and of `rewards/mean`.
Writes `summary.md`, `summary.csv` and `reward_curves.png` into MULTIRUN_DIR and prints the table.
The objective and its direction default to the jobs' `objective` and the Optuna sweeper's
`direction` (maximize for a grid). With `--over seed` (any swept key) a second table groups the
done jobs that differ only in that key: the objective before training (summary.json's `before`)
and after, and the final reward, as mean +- population std over the group.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import matplotlib
import yaml

from grpo.run.records import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REWARD = "rewards/mean"


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def job_status(job: Path) -> str:
    """done (summary.json written), running (its process is alive here), or failed."""
    if (job / "summary.json").exists():
        return "done"
    info_path = job / "run_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        last = (info.get("resumes") or [info])[-1]
        if last.get("host") == socket.gethostname() and _alive(last.get("pid")):
            return "running"
    return "failed"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _values(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [
        (r["step"], float(r[key]))
        for r in rows
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]


def collect(sweep_dir: Path, objective: str | None) -> tuple[list[dict[str, Any]], str]:
    """One record per job folder: overrides, status, metrics; and the objective's name."""
    jobs = sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir())
    records = []
    for job in jobs:
        config = _load_yaml(job / ".hydra" / "config.yaml") or {}
        objective = objective or config.get("objective", "eval/accuracy_strict")
        overrides = _load_yaml(job / ".hydra" / "overrides.yaml") or []
        rows = read_metrics(job)
        summary = (
            json.loads((job / "summary.json").read_text())
            if (job / "summary.json").exists()
            else {}
        )
        records.append(
            {
                "job": str(job.relative_to(sweep_dir)) or ".",
                "status": job_status(job),
                "overrides": dict(o.split("=", 1) for o in overrides if "=" in o),
                "steps": max((r["step"] for r in rows), default=0),
                "rows": rows,
                "summary": summary,
            }
        )
    return records, objective or "eval/accuracy_strict"


def direction_of(sweep_dir: Path) -> str:
    """The Optuna sweeper's direction from a job's hydra.yaml, else maximize."""
    for hydra_yaml in sweep_dir.rglob(".hydra/hydra.yaml"):
        sweeper = ((_load_yaml(hydra_yaml) or {}).get("hydra") or {}).get("sweeper") or {}
        if isinstance(sweeper.get("direction"), str):
            return sweeper["direction"]
    return "maximize"


def varying_overrides(records: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs (the swept ones)."""
    keys = sorted({k for r in records for k in r["overrides"]})
    return [k for k in keys if len({r["overrides"].get(k) for r in records}) > 1]


def table(records: list[dict[str, Any]], objective: str, direction: str) -> list[dict[str, Any]]:
    """Rows ranked by the final objective: done jobs first, best first; then the others."""
    varying = varying_overrides(records)
    best = max if direction == "maximize" else min
    out = []
    for r in records:
        curve = _values(r["rows"], objective)
        final = r["summary"].get(objective, curve[-1][1] if curve else None)
        rewards = _values(r["rows"], REWARD)
        row = {"rank": 0, "job": r["job"], "status": r["status"], "steps": r["steps"]}
        row.update({k: r["overrides"].get(k, "") for k in varying})
        row[f"{objective} final"] = final
        row[f"{objective} best"] = best(v for _, v in curve) if curve else None
        row[f"{REWARD} final"] = rewards[-1][1] if rewards else None
        row[f"{REWARD} best"] = max(v for _, v in rewards) if rewards else None
        out.append(row)
    sign = -1 if direction == "maximize" else 1

    def rank(row: dict[str, Any]) -> tuple:
        final = row[f"{objective} final"]
        return (row["status"] != "done", final is None, sign * (final or 0.0), row["job"])

    out.sort(key=rank)
    for i, row in enumerate(out, start=1):
        row["rank"] = i
    return out


def _mean_spread(values: list[float]) -> str:
    """mean +- population std (with two values: +- half their difference)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return f"{mean:.3f} +- {std:.3f}"


def aggregate(records: list[dict[str, Any]], objective: str, over: str) -> list[dict[str, Any]]:
    """One row per group of done jobs that differ only in `over`: mean +- spread."""
    keys = [k for k in varying_overrides(records) if k != over]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["status"] == "done":
            groups.setdefault(tuple(r["overrides"].get(k, "") for k in keys), []).append(r)
    rows = []
    for values, members in groups.items():
        row: dict[str, Any] = dict(zip(keys, values, strict=True))
        row[over] = ",".join(sorted(m["overrides"].get(over, "") for m in members))
        before = [m["summary"].get("before", {}).get(objective) for m in members]
        after = [m["summary"].get(objective) for m in members]
        curves = [_values(m["rows"], REWARD) for m in members]
        reward = [curve[-1][1] for curve in curves if curve]
        row[f"{objective} before"] = _mean_spread([v for v in before if v is not None])
        row[f"{objective} after"] = _mean_spread([v for v in after if v is not None])
        row[f"{REWARD} last step"] = _mean_spread(reward) if reward else None
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    head = list(rows[0]) if rows else ["job"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _short(value: str | None) -> str:
    """An override value, numbers to 4 significant digits."""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _running_mean(values: tuple[float, ...]) -> list[float]:
    """Mean of the last max(1, n // 10) values at each point."""
    window = max(1, len(values) // 10)
    recent = [values[max(0, i + 1 - window) : i + 1] for i in range(len(values))]
    return [sum(r) / len(r) for r in recent]


def plot_rewards(records: list[dict[str, Any]], varying: list[str], path: Path) -> None:
    """Each job's `rewards/mean` per step, raw and smoothed; jobs not done dashed."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in records:
        curve = _values(r["rows"], REWARD)
        if not curve:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_short(r['overrides'].get(k))}" for k in varying)
        style = "-" if r["status"] == "done" else "--"
        steps, values = zip(*curve, strict=True)
        (raw,) = ax.plot(steps, values, style, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _running_mean(values), style, color=raw.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{REWARD} (training batch)")
    ax.set_title(
        f"{path.parent.name}: reward per step, {len(records)} jobs "
        "(faint: raw, bold: running mean over 10% of steps; dashed: not done)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(
    sweep_dir: Path,
    objective: str | None = None,
    direction: str | None = None,
    over: str | None = None,
) -> str:
    """Write summary.md, summary.csv and reward_curves.png into `sweep_dir`; return the table
    (and, `over` a swept key, the table of means over it)."""
    records, objective = collect(sweep_dir, objective)
    direction = direction or direction_of(sweep_dir)
    rows = table(records, objective, direction)
    text = markdown(rows, f"{sweep_dir}: {len(rows)} jobs, ranked by {objective} ({direction})")
    if over:
        means = aggregate(records, objective, over)
        text += "\n" + markdown(means, f"mean +- population std over {over}")
    (sweep_dir / "summary.md").write_text(text)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)
    plot_rewards(records, varying_overrides(records), sweep_dir / "reward_curves.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (jobs in subfolders)")
    parser.add_argument("--objective", help="metric to rank by (default: the jobs' objective)")
    parser.add_argument("--direction", choices=["maximize", "minimize"])
    parser.add_argument("--over", help="a swept key (e.g. seed) to average the jobs over")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        parser.error(f"not a folder: {args.sweep_dir}")
    print(summarize(args.sweep_dir, args.objective, args.direction, args.over), end="")


if __name__ == "__main__":
    main()
