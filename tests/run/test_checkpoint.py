"""Checkpoints: exact save/restore, keeping the last K, atomic writes under a real kill, NaN."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, cli_env, run_train, tiny_policy
from omegaconf import OmegaConf
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from grpo.actor.reference import Reference
from grpo.rollout.sampler import GroupedSampler
from grpo.run.checkpoint import (
    META,
    STATE,
    WEIGHTS,
    Checkpointer,
    ResumePoint,
    find_resume_point,
    list_checkpoints,
    pass_run_id,
    rewind,
)
from grpo.run.config import ConfigError


def make_parts(seed: int, width: int = 8):
    """A small model (one frozen tensor), AdamW, a warm-up schedule and a grouped sampler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)
    sampler = GroupedSampler(num_prompts=10, batch_size=2, group_size=2, seed=0)
    return SimpleNamespace(model=model), optimizer, scheduler, sampler


def train_step(policy, optimizer, scheduler, sampler) -> list[int]:
    """One step that uses every random source, like the training loop does."""
    batch = next(sampler).prompt_indices
    x = torch.randn(3, 4) + random.random() + float(np.random.rand())
    policy.model(x).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return batch


def checkpointer(run_dir: Path, parts, save_every=1, keep=2, max_steps=100) -> Checkpointer:
    trainer = SimpleNamespace(save_every=save_every, keep_checkpoints=keep, max_steps=max_steps)
    return Checkpointer(run_dir, trainer, *parts)


def snapshot(parts, steps: int) -> dict:
    """Weights, learning rate and batches after `steps` more steps."""
    batches = [train_step(*parts) for _ in range(steps)]
    weights = {k: v.clone() for k, v in parts[0].model.state_dict().items()}
    return {"batches": batches, "weights": weights, "lr": parts[2].get_last_lr()}


def test_restore_continues_exactly_like_an_uninterrupted_run(tmp_path):
    parts = make_parts(seed=0)
    for _ in range(3):
        train_step(*parts)
    path = checkpointer(tmp_path, parts).save(3, before={"eval/x": 0.5})
    expected = snapshot(parts, steps=4)

    other = make_parts(seed=0)  # the same base, then moved on: other weights, state, RNG
    random.seed(9)
    for _ in range(2):
        train_step(*other)
    step, before = checkpointer(tmp_path, other).restore(find_resume_point(tmp_path, "auto"))
    assert (step, before) == (3, {"eval/x": 0.5})
    got = snapshot(other, steps=4)
    assert got["batches"] == expected["batches"] and got["lr"] == expected["lr"]
    for name, value in expected["weights"].items():
        assert torch.equal(got["weights"][name], value), name
    assert path == tmp_path / "checkpoints" / "step_000003"


@pytest.mark.parametrize("offload", [False, True])
def test_a_moving_reference_is_saved_and_restored(tmp_path, offload):
    policy = tiny_policy()
    reference = Reference(policy, 1.0, every=1, mix=0.5, offload=offload)
    _, _, scheduler, sampler = make_parts(seed=0)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=0.1)
    parts = (policy, optimizer, scheduler, sampler)
    trainer = SimpleNamespace(save_every=1, keep_checkpoints=2, max_steps=10)
    ckpt = Checkpointer(tmp_path, trainer, *parts, reference=reference)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.1)
    reference.maybe_update(1)  # halfway to the moved policy
    with reference.weights():
        saved = [p.clone() for p in reference.model.parameters()]
    ckpt.save(1, before={})
    reference.maybe_update(2)  # moves on
    ckpt.restore(find_resume_point(tmp_path, "auto"))
    with reference.weights():
        for p, want in zip(reference.model.parameters(), saved, strict=True):
            assert torch.equal(p, want)


def test_files_load_with_dcp_and_weights_only_torch_load(tmp_path):
    parts = make_parts(seed=0)
    train_step(*parts)
    logger = SimpleNamespace(run_id="wandb-run-7")  # a logger that exposes its run id
    trainer = SimpleNamespace(save_every=1, keep_checkpoints=2, max_steps=10)
    path = Checkpointer(tmp_path, trainer, *parts, logger=logger).save(1, before={})
    plain = tmp_path / "plain.pt"  # DCP's own converter to one torch.save file
    dcp_to_torch_save(path / WEIGHTS, plain)
    saved = torch.load(plain, weights_only=True)
    assert set(saved["model"]) == {"0.weight", "1.weight", "1.bias"}  # 0.bias is frozen
    assert torch.equal(saved["model"]["1.bias"], parts[0].model[1].bias)
    assert set(saved["optimizer"]["state"]) == {"0.weight", "1.weight", "1.bias"}
    state = torch.load(path / STATE, weights_only=True)
    assert {"scheduler", "sampler", "rng", "step"} <= set(state)
    meta = json.loads((path / META).read_text())
    assert meta["step"] == 1 and meta["run_id"] == "wandb-run-7"


class ResumableLogger:
    """A logger whose constructor takes the run id to resume."""

    def __init__(self, run_dir: str, resume_id: str | None = None) -> None:
        self.resume_id = resume_id


class PlainLogger:
    """A logger that cannot resume a run."""

    def __init__(self, run_dir: str) -> None:
        pass


def test_the_run_id_goes_to_a_logger_that_can_resume_it(capsys):
    cfg = OmegaConf.create({"logging": {"_target_": f"{__name__}.ResumableLogger"}})
    OmegaConf.set_struct(cfg, True)
    pass_run_id(cfg, "wandb-run-7")
    assert cfg.logging.resume_id == "wandb-run-7"
    plain = OmegaConf.create({"logging": {"_target_": f"{__name__}.PlainLogger"}})
    pass_run_id(plain, "wandb-run-7")
    assert "resume_id" not in plain.logging
    assert "cannot resume logger run wandb-run-7" in capsys.readouterr().err


def test_keeps_only_the_last_k_and_no_temporary_folders(tmp_path):
    ckpt = checkpointer(tmp_path, make_parts(seed=0), keep=2)
    for step in range(1, 6):
        ckpt.save(step, before={})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000004",
        "step_000005",
    ]


def test_step_end_saves_every_n_steps_but_not_at_the_last(tmp_path):
    ckpt = checkpointer(tmp_path, make_parts(seed=0), save_every=2, keep=10, max_steps=6)
    for step in range(1, 7):
        ckpt.step_end(step, before={})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000004"]


def test_a_signal_checkpoints_at_the_step_end_then_exits(tmp_path):
    ckpt = checkpointer(tmp_path, make_parts(seed=0), save_every=0, max_steps=6)
    ckpt.catch_signals()
    try:
        ckpt.step_end(1, before={})
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.stop_signal == signal.SIGTERM  # caught: the process goes on to the step end
        with pytest.raises(SystemExit) as stop:
            ckpt.step_end(2, before={})
    finally:
        ckpt.release_signals()
    assert stop.value.code == 128 + signal.SIGTERM
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_non_finite_weights_are_never_saved(tmp_path):
    parts = make_parts(seed=0)
    ckpt = checkpointer(tmp_path, parts)
    good = ckpt.save(1, before={})
    with torch.no_grad():
        parts[0].model[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"non-finite weights .*stays {good}"):
        ckpt.save(2, before={})
    assert list_checkpoints(tmp_path) == [good]


def test_rewind_cuts_logs_to_the_checkpoint_and_drops_later_checkpoints(tmp_path):
    lines = [json.dumps({"step": s}) + "\n" for s in range(6)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 6, "tor')
    (tmp_path / "samples.jsonl").write_text(lines[4])  # written after the checkpoint
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    meta = {"step": 2, "jsonl_lines": {"metrics.jsonl": 3}}
    rewind(tmp_path, ResumePoint(tmp_path / "checkpoints" / "step_000002", 2, meta))
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])
    assert (tmp_path / "samples.jsonl").read_text() == ""
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]


def test_resume_choice_never_overwrites_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert find_resume_point(run, None) is None  # empty folder: fresh run
    assert find_resume_point(run, "auto") is None  # nothing to resume: fresh run
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ConfigError, match="trainer.resume=null: .* already holds a run"):
        find_resume_point(run, None)
    with pytest.raises(ConfigError, match="trainer.resume=auto: .* no checkpoint"):
        find_resume_point(run, "auto")
    path = checkpointer(run, make_parts(seed=0)).save(3, before={})
    assert find_resume_point(run, "auto").path == path
    assert find_resume_point(run, str(run)).path == path  # the run folder: its latest
    with pytest.raises(ConfigError, match=f"add hydra.run.dir={run}"):
        find_resume_point(tmp_path / "elsewhere", str(path))


KILLED_SAVE = """
import sys
from types import SimpleNamespace
import torch
from grpo.run.checkpoint import Checkpointer
from grpo.rollout.sampler import GroupedSampler
from grpo.actor.reference import Reference

model = torch.nn.Linear(4096, 4096)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 4096)).sum().backward()
optimizer.step()
scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
trainer = SimpleNamespace(save_every=1, keep_checkpoints=3, max_steps=10)
ckpt = Checkpointer(sys.argv[1], trainer, SimpleNamespace(model=model), optimizer, scheduler,
                    GroupedSampler(4, 2, 2))
for step, value in ((1, 1.0), (2, 2.0)):
    with torch.no_grad():
        model.weight.fill_(value)
    ckpt.save(step, before={})
    print("saved", step, flush=True)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "saved 1"
    deadline = time.monotonic() + 60
    while not list((tmp_path / "checkpoints").glob(".tmp-step_000002-*")):
        assert time.monotonic() < deadline and child.poll() is None, "save 2 never started"
        time.sleep(0.001)
    child.kill()  # SIGKILL, in the middle of writing step 2
    child.wait()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]

    model = torch.nn.Linear(4096, 4096)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    parts = (SimpleNamespace(model=model), optimizer, scheduler, GroupedSampler(4, 2, 2))
    ckpt = checkpointer(tmp_path, parts, keep=3)
    assert ckpt.restore(find_resume_point(tmp_path, "auto"))[0] == 1
    assert bool((model.weight == 1.0).all()) and optimizer.state
    ckpt.save(2, before={})  # the next save clears the torn temporary folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000001",
        "step_000002",
    ]


def test_a_nan_gradient_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # A huge learning rate: the first steps are finite, then the weights overflow the forward.
    proc = run_train(
        *TINY,
        "trainer.max_steps=6",
        "trainer.save_every=1",
        "trainer.learning_rate=1e30",
        "reward=hybrid",  # graded rewards: a random tiny model gets non-zero advantages
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode != 0
    assert "FloatingPointError: non-finite gradient norm" in proc.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    last_good = steps[-1]  # the failed step logged nothing
    assert 1 <= last_good < 6 and steps == list(range(1, last_good + 1))
    assert list_checkpoints(run_dir)[-1].name == f"step_{last_good:06d}"
    for path in list_checkpoints(run_dir):
        dcp_to_torch_save(path / WEIGHTS, tmp_path / "plain.pt")
        weights = torch.load(tmp_path / "plain.pt", weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values())
