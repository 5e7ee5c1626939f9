"""What a run folder records about how it was made, so it can be read, compared and run again.

At the start of a fresh run, `record_run` writes into the run folder:
- `config.yaml`: the fully resolved config (Hydra's `.hydra/` keeps the unresolved one and the
  command-line overrides);
- `run_info.json`: command, overrides, seed, start time, host and pid, the code state (git
  commit, branch, hash of the uncommitted diff), python and torch versions, and the hardware
  (CPU model and cores, torch threads, GPUs, memory);
- `git.diff`: the uncommitted changes of the code (tracked files, and untracked ones in full);
- `packages.txt`: every installed distribution as `name==version` (importlib.metadata).
A resumed run keeps these, checks that the config is unchanged, and appends to `resumes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from grpo.run.config import ConfigError

CODE_ROOT = Path(__file__).resolve().parents[1]
# Keys that may change when a run is resumed: how long it runs and how it saves, not what it does.
RESUMABLE_KEYS = (
    "trainer.resume",
    "trainer.max_steps",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.num_threads",
    "trainer.keep_freed_memory",
    "logging.progress_bar",
    # where the vLLM servers run and how long they may take (mode=server)
    "rollout.vllm.servers",
    "rollout.vllm.connect_timeout_s",
    "rollout.vllm.start_timeout_s",
    "rollout.vllm.request_timeout_s",
    "rollout.vllm.weights_dir",
    "rollout.vllm.weight_transfer",
)
# Logged numbers that measure speed, not results: left out when two runs are compared.
TIMING_KEY = re.compile(r"^time/|tokens_per_s|tokens/s")
UNTRACKED_MAX_BYTES = 1_000_000  # untracked files larger than this are listed, not copied


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "--no-optional-locks", "-C", str(CODE_ROOT), *args],
        capture_output=True,
        text=True,
    )


def code_state() -> dict[str, Any]:
    """The code's git commit and branch, and its uncommitted diff (with untracked files)."""
    head = _git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "branch": None, "diff": "", "diff_sha256": None}
    diff = _git("diff", "--binary", "HEAD").stdout
    untracked = _git("ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0")
    for name in filter(None, untracked):
        file = CODE_ROOT / name
        if file.stat().st_size > UNTRACKED_MAX_BYTES:
            diff += f"# untracked, not copied (over {UNTRACKED_MAX_BYTES} bytes): {name}\n"
        else:
            diff += _git("diff", "--binary", "--no-index", "--", "/dev/null", name).stdout
    return {
        "commit": head.stdout.strip(),
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip(),
        "diff": diff,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def code_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the current code state differs from a recorded one (empty: same code)."""
    notes = []
    if recorded.get("commit") != current.get("commit"):
        notes.append(f"git commit {recorded.get('commit')} then, {current.get('commit')} now")
    if recorded.get("diff_sha256") != current.get("diff_sha256"):
        notes.append("the uncommitted changes differ (the run's are in its git.diff)")
    return notes


def hardware() -> dict[str, Any]:
    """CPU, threads, memory and GPUs of this machine, as torch sees them."""
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = models[0] if models else cpu
    gpus = [
        {
            "name": torch.cuda.get_device_name(i),
            "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_gb": round(memory / 2**30, 1),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")
            if k in os.environ
        },
    }


def packages() -> list[str]:
    """`name==version` of every installed distribution, sorted (like `pip freeze`)."""
    found = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    return sorted(f"{name}=={version}" for name, version in found.items())


def _process() -> dict[str, Any]:
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {
        "time": datetime.now().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "overrides": overrides,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_run(cfg: DictConfig, run_dir: Path, resume_step: int | None) -> None:
    """Write the run's metadata (fresh run), or check and note a resume from `resume_step`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path = run_dir / "run_info.json"
    code = code_state()
    if resume_step is None or not info_path.exists():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "git.diff").write_text(code.pop("diff"))
        (run_dir / "packages.txt").write_text("\n".join(packages()) + "\n")
        info = {
            "seed": cfg.seed,
            **_process(),
            "code": code,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "hardware": hardware(),
            "resumes": [],
        }
        _write_atomic(info_path, json.dumps(info, indent=2) + "\n")
        return
    check_same_config(cfg, run_dir)
    info = json.loads(info_path.read_text())
    code.pop("diff")
    changed = code_differences(info["code"], code)
    for note in changed:
        print(f"warning: resuming {run_dir} with different code: {note}", file=sys.stderr)
    info["resumes"].append(
        {"from_step": resume_step, **_process(), "code": code, "code_changed": changed}
    )
    _write_atomic(info_path, json.dumps(info, indent=2) + "\n")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to resume with a config that differs from the run's (except `RESUMABLE_KEYS`)."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    differ = [
        f"{key} (run: {saved.get(key)!r}, now: {now.get(key)!r})"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key) and not key.startswith(RESUMABLE_KEYS)
    ]
    if differ:
        started = json.loads((run_dir / "run_info.json").read_text())["overrides"]
        raise ConfigError(
            f"trainer.resume: the config differs from the run's ({run_dir / 'config.yaml'}) at "
            + "; ".join(differ[:10])
            + f". Resume with the run's overrides: {' '.join(started)}"
        )


def job_threads(num_threads: int | None) -> int | None:
    """torch threads for this job: `num_threads` when set; else, when a launcher runs jobs side
    by side, the job's share of the cores (joblib: cores // n_jobs; submitit: cpus_per_task);
    else None (torch's default)."""
    if num_threads or not HydraConfig.initialized():
        return num_threads
    launcher = HydraConfig.get().launcher
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    n_jobs = launcher.get("n_jobs")
    if n_jobs is None:
        return None
    cores = len(os.sched_getaffinity(0))
    jobs = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)  # joblib: -1 = all cores
    return max(cores // jobs, 1)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, one dict per line (a torn last line is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def compare_metrics(run_a: Path, run_b: Path, tolerance: float = 0.0) -> list[str]:
    """Where two runs' metrics.jsonl differ, timing keys left out; empty when they match."""
    a, b = read_metrics(run_a), read_metrics(run_b)
    problems = [] if len(a) == len(b) else [f"{len(a)} lines vs {len(b)} lines"]
    for line, (x, y) in enumerate(zip(a, b, strict=False), start=1):
        keys = {k for k in x.keys() | y.keys() if not TIMING_KEY.search(k)}
        for key in sorted(keys):
            u, v = x.get(key), y.get(key)
            same = u == v or (
                isinstance(u, float) and isinstance(v, float) and abs(u - v) <= tolerance
            )
            if not same and not (u != u and v != v):  # NaN equals NaN here
                problems.append(f"line {line} (step {x.get('step')}): {key} {u!r} vs {v!r}")
    return problems


class CreateSweepDir(Callback):
    """Hydra callback: create the sweep folder when a multirun starts, before the sweeper,
    so an Optuna study can keep its SQLite file there (`hydra.sweeper.storage`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
