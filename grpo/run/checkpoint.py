"""Checkpoints: every `trainer.save_every` steps and on SIGTERM/SIGINT; exact resume.

A checkpoint is a folder `RUN/checkpoints/step_000120/` holding
- `weights/`: the trainable weights (LoRA adapters, or all weights) and the optimizer state, by
  parameter name, written by torch.distributed.checkpoint (DCP): with FSDP every rank writes
  its own shards, and a run resumes on the same number of processes;
- `reference.safetensors` when the reference policy is updated during training;
- `trainer_state.pt`: scheduler, sampler position and RNG states (python, numpy, torch, CUDA)
  of every rank; it loads with `torch.load(weights_only=True)`;
- `meta.json`: the step, the policy version (the same number: the updates done; batches a
  producer drew ahead are not kept, `grpo.rollout.producer`), the trackers' run ids
  (wandb, MLflow, ...), the held-out results before training, and how many lines each
  `*.jsonl` log of the run folder had, so a resumed run writes each step once.

It is written into a temporary folder and renamed into place, so a kill during a save leaves
the earlier checkpoints whole: every `step_*` folder is complete. The last
`trainer.keep_checkpoints` are kept. Weights that are not finite are never saved.

Resume (`trainer.resume=auto hydra.run.dir=RUN`, with the run's overrides) restores all of it,
so a run killed at any point and resumed logs the same numbers as one never interrupted.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from grpo import distributed
from grpo.rollout.base import BackendLost
from grpo.run.config import ConfigError
from grpo.run.records import record_run

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHTS, REFERENCE, STATE, META = (
    "weights",
    "reference.safetensors",
    "trainer_state.pt",
    "meta.json",
)
# The trainable parameters only (a LoRA base stays out); their names are checked on restore.
STATE_DICT = StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass
class ResumePoint:
    """A checkpoint to continue from."""

    path: Path
    step: int
    meta: dict[str, Any]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume_point(run_dir: Path, resume: str | None) -> ResumePoint | None:
    """The checkpoint that `trainer.resume` names (None: a fresh run); never overwrites a run.

    `resume`: null = fresh run, refused if `run_dir` already holds one (metrics.jsonl);
    `auto` = the latest checkpoint of `run_dir`, or a fresh run if it holds no run yet;
    a path = that checkpoint folder, or the latest of that run folder, which must be `run_dir`.
    """
    run_dir = Path(run_dir).resolve()
    has_run = (run_dir / "metrics.jsonl").exists()
    hint = f"pick a new hydra.run.dir, or continue it: trainer.resume=auto hydra.run.dir={run_dir}"
    if resume is None:
        if has_run:
            raise ConfigError(f"trainer.resume=null: {run_dir} already holds a run; {hint}")
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            if has_run:
                raise ConfigError(
                    f"trainer.resume=auto: {run_dir} holds a run but no checkpoint to continue "
                    "from (trainer.save_every=0?); pick a new hydra.run.dir"
                )
            return None
        path = checkpoints[-1]
    else:
        path = Path(resume).expanduser().resolve()
        if (path / CHECKPOINTS).is_dir() and list_checkpoints(path):
            path = list_checkpoints(path)[-1]
        if not (path / META).is_file():
            raise ConfigError(f"trainer.resume={resume!r}: not a checkpoint or run folder")
        if path.parent.parent != run_dir:
            raise ConfigError(
                f"trainer.resume={resume!r}: a checkpoint of {path.parent.parent}; a run "
                f"continues in its own folder: add hydra.run.dir={path.parent.parent}"
            )
    meta = json.loads((path / META).read_text())
    return ResumePoint(path, meta["step"], meta)


def start_run(cfg: DictConfig, run_dir: Path) -> ResumePoint | None:
    """Before anything loads: decide fresh run or resume, record the run's metadata, and, when
    resuming, rewind the logs to the checkpoint and hand the logger its run id."""
    point = find_resume_point(run_dir, cfg.trainer.resume)
    record_run(cfg, Path(run_dir), point.step if point else None)
    if point is not None:
        rewind(Path(run_dir), point)
        pass_run_id(cfg, point.meta.get("run_id"))
        print(f"resuming {run_dir} from {point.path} (step {point.step})", file=sys.stderr)
    return point


def rewind(run_dir: Path, point: ResumePoint) -> None:
    """Cut each `*.jsonl` log back to its lines at the checkpoint; drop later checkpoints."""
    lines = point.meta.get("jsonl_lines", {})
    for log in run_dir.glob("*.jsonl"):
        kept = log.read_bytes().split(b"\n")[: lines.get(log.name, 0)]
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, log)
    for later in list_checkpoints(run_dir):
        if int(STEP_DIR.match(later.name).group(1)) > point.step:
            _remove(later)


def pass_run_id(cfg: DictConfig, run_id: str | None) -> None:
    """Set `logging.resume_id` when the logger takes one (the trackers resume their runs)."""
    if run_id is None:
        return
    if "resume_id" in inspect.signature(get_class(cfg.logging._target_)).parameters:
        with open_dict(cfg.logging):
            cfg.logging.resume_id = run_id
    else:
        print(f"note: {cfg.logging._target_} cannot resume logger run {run_id}", file=sys.stderr)


def _remove(path: Path) -> None:
    """Delete a folder: renamed away first, so no half-deleted `step_*` folder is ever seen."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    key, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {
        "python": random.getstate(),
        "numpy": {"key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    key = np.array(n["key"], dtype=np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _this_rank(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """This rank's sampler and RNG states in a checkpoint's `trainer_state.pt`."""
    others = state.get("other_ranks", [])
    if len(others) + 1 != distributed.world_size():
        raise ConfigError(
            f"{path}: written by {len(others) + 1} processes; resume it with as many "
            f"(now {distributed.world_size()})"
        )
    return state if distributed.rank() == 0 else others[distributed.rank() - 1]


def _finite(tensor: Any) -> bool:
    """Whether a (possibly FSDP-sharded) tensor holds only finite numbers (this rank's part)."""
    local = tensor.to_local() if distributed.sharded(tensor) else tensor
    return bool(torch.isfinite(local).all())


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it was."""

    def __init__(
        self,
        run_dir: Path,
        trainer: Any,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        sampler: Any,
        logger: Any = None,
        reference: Any = None,
    ) -> None:
        """`trainer` gives `save_every`, `keep_checkpoints`, `max_steps`; `policy.model` is the
        trained model; optimizer, scheduler and sampler have `state_dict`/`load_state_dict`."""
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / CHECKPOINTS
        self.save_every, self.keep = trainer.save_every, trainer.keep_checkpoints
        self.max_steps = trainer.max_steps
        self.model, self.logger, self.optimizer = policy.model, logger, optimizer
        self.stateful = {"scheduler": scheduler, "sampler": sampler}
        # A reference policy that moves during training (full fine-tuning) is state too.
        self.reference = reference if getattr(reference, "every", 0) else None
        self.stop_signal: int | None = None
        self.finished, self.finished_state = 0, {}  # the last finished step (`guard`)
        self._previous: dict[int, Any] = {}

    def _weights(self) -> dict[str, Any]:
        """The trainable weights and the optimizer state as DCP state dicts (this rank's shards
        under FSDP)."""
        model, optimizer = get_state_dict(self.model, self.optimizer, options=STATE_DICT)
        return {"model": model, "optimizer": optimizer}

    def save(self, step: int, before: dict[str, float]) -> Path:
        """Write checkpoint `step` atomically, then delete all but the last `keep`.

        Every rank calls it: each writes its weight shards, and rank 0 the rest, with each
        rank's sampler position and RNG states (`other_ranks`): ranks sample differently.
        """
        weights = self._weights()
        bad = [n for n, t in weights["model"].items() if not _finite(t)]
        if distributed.max_over_ranks(int(bool(bad))):
            raise FloatingPointError(
                f"step {step}: non-finite weights ({bad[0] if bad else 'on another rank'}...); "
                f"not saved, the last good checkpoint stays {self.latest()}"
            )
        ranks = distributed.gather_to_main(
            {"sampler": self.stateful["sampler"].state_dict(), "rng": _rng_state()}
        )
        tmp = distributed.main_then_share(self._new_folder, step)
        dcp.save(weights, checkpoint_id=tmp / WEIGHTS)
        final = self.root / f"step_{step:06d}"
        if distributed.is_main():
            self._finish(tmp, final, step, before, ranks)
        distributed.barrier()  # no rank goes on before the checkpoint is whole
        return final

    def _new_folder(self, step: int) -> Path:
        """A fresh temporary folder for checkpoint `step`; leftovers of a kill removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=self.root))

    def _finish(
        self, tmp: Path, final: Path, step: int, before: dict[str, float], ranks: list[Any]
    ) -> None:
        """Rank 0: the reference, the trainer state and the metadata; then the rename that
        makes the checkpoint exist, and the deletion of all but the last `keep`."""
        if self.reference is not None:
            with self.reference.weights():
                ref = self.reference.model.named_parameters()
                save_file({n: p.detach().cpu().contiguous() for n, p in ref}, tmp / REFERENCE)
        state = {k: obj.state_dict() for k, obj in self.stateful.items()}
        torch.save({**state, **ranks[0], "other_ranks": ranks[1:], "step": step}, tmp / STATE)
        meta = {
            "step": step,
            "policy_version": step,  # training steps whose update is done (grpo.rollout.producer)
            "run_id": getattr(self.logger, "run_id", None),
            "before": before,
            "jsonl_lines": {p.name: _count_lines(p) for p in self.run_dir.glob("*.jsonl")},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        for file in [*tmp.iterdir(), *(tmp / WEIGHTS).iterdir()]:
            _fsync(file)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        _fsync(self.root)
        for old in list_checkpoints(self.run_dir)[: -self.keep]:
            _remove(old)

    def latest(self) -> Path | None:
        found = list_checkpoints(self.run_dir)
        return found[-1] if found else None

    def restore(self, point: ResumePoint) -> tuple[int, dict[str, float]]:
        """Load checkpoint `point` into the model, optimizer, scheduler, sampler and RNGs;
        returns its step and the held-out results from before training."""
        weights = self._weights()
        saved = set(dcp.FileSystemReader(point.path / WEIGHTS).read_metadata().state_dict_metadata)
        names = {f"model.{n}" for n in weights["model"]}
        if not names <= saved or not {n for n in saved if n.startswith("model.")} <= names:
            missing = sorted(names - saved)[:3]
            extra = sorted(n for n in saved - names if n.startswith("model."))[:3]
            raise ValueError(
                f"{point.path}: trainable weights do not match the model "
                f"(missing {missing}, unexpected {extra}): was the model config changed?"
            )
        dcp.load(weights, checkpoint_id=point.path / WEIGHTS)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=weights["model"],
            optim_state_dict=weights["optimizer"],
            options=STATE_DICT,
        )
        with torch.no_grad():
            if self.reference is not None:
                ref = load_file(point.path / REFERENCE)
                with self.reference.weights(changes=True):
                    for name, param in self.reference.model.named_parameters():
                        param.copy_(ref[name])
        state = torch.load(point.path / STATE, weights_only=True)
        state.update(_this_rank(state, point.path))  # its own sampler position and RNG
        for key, obj in self.stateful.items():
            obj.load_state_dict(state[key])
        self.model.eval()  # as every step leaves it
        _set_rng_state(state["rng"])
        return point.step, point.meta["before"]

    def step_end(self, step: int, before: dict[str, float]) -> None:
        """After step `step`: checkpoint every `save_every` steps, and when a stop signal came,
        then exit. The last step saves none: the run ends with model/ and summary.json."""
        self._finished(step)
        due = self.save_every and step % self.save_every == 0
        stop = distributed.max_over_ranks(self.stop_signal or 0)  # all ranks stop together
        if step < self.max_steps and (due or stop):
            path = self.save(step, before)
            if stop:
                name = signal.Signals(stop).name
                print(
                    f"\n{name}: stopped after step {step}, checkpoint {path}; continue with the "
                    f"same overrides and trainer.resume=auto hydra.run.dir={self.run_dir}",
                    file=sys.stderr,
                )
                raise SystemExit(128 + stop)

    @contextmanager
    def guard(self, before: dict[str, float]) -> Iterator[None]:
        """Around the step loop: SIGTERM/SIGINT finish the step, checkpoint and exit
        (`step_end`); a lost rollout backend (`BackendLost`, a vLLM server gone) stops the run
        at once with a checkpoint and one line. That checkpoint is the last finished step's
        (the prompts and random draws of the step that failed undone), or, when the failing
        step's update is done (the server was lost in the weight sync or an evaluation), that
        step's, whose metrics line is then missing. One process only: the other ranks would
        not know."""
        self.catch_signals()
        self._finished(self.stateful["scheduler"].last_epoch)
        try:
            yield
        except BackendLost as error:
            updated = self.stateful["scheduler"].last_epoch  # it steps once per update
            if updated == self.finished:  # weights of the finished step: undo the draws
                self.stateful["sampler"].load_state_dict(self.finished_state["sampler"])
                _set_rng_state(self.finished_state["rng"])
            path = self.save(updated, before)
            raise BackendLost(
                f"{error}; stopped with checkpoint {path} (step {updated}); once it is back, "
                f"continue with trainer.resume=auto hydra.run.dir={self.run_dir}"
            ) from None
        finally:
            self.release_signals()

    def _finished(self, step: int) -> None:
        """Remember that `step` is finished, with the sampler and RNG states it left."""
        self.finished = step
        self.finished_state = {
            "sampler": self.stateful["sampler"].state_dict(),
            "rng": _rng_state(),
        }

    def catch_signals(self) -> None:
        """SIGTERM/SIGINT from now on: finish the step, checkpoint, exit (a second one, at once)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def release_signals(self) -> None:
        """Put back the signal handlers that `catch_signals` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # one-shot
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )
