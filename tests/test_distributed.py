"""Data parallelism with real processes (torchrun, gloo on CPU): N ranks make one process's update.

Exactness is checked on a fixed batch: every rank generates the same global batch from the same
seed, keeps its share of the groups, and makes one SGD step (no clipping, no LoRA dropout, so
gradient scale errors show), with DDP and with FSDP. Dynamic sampling's refill rounds are
collective: 2 ranks draw the same prompts as one process. The CLI runs show the rest: the
defaults under torchrun, sampling sharded by rank, one writer, FSDP full fine-tuning killed
with SIGKILL and resumed from its sharded checkpoint. Their sampling cannot match one process's
draw for draw: each rank samples its own groups with its own random stream, so those runs are
compared with themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import REPO, TINY, cli_env, compose_config, generate, make_actor, read_metrics
from hydra.utils import instantiate

from grpo import distributed
from grpo.actor.reference import Reference
from grpo.algorithm.loss import GRPOLoss
from grpo.batch import RewardOutput, Rollout, ScoredRollout, take
from grpo.rollout.dynamic_sampling import sample_groups
from grpo.rollout.sampler import GroupedSampler
from grpo.run.checkpoint import list_checkpoints
from grpo.run.config import ConfigError, validate_config
from grpo.run.records import compare_metrics
from grpo.run.schema import Strategy

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")  # DeepSeekMath's default; token-level
QUESTIONS = [
    "Ava has 3 apples and gets 4 more. How many?",
    "Ben buys 2 bags of 5 pens. How many pens?",
    "Kai has 9 books and gives away 4. How many are left?",
    "Jo has 6 boxes with 3 marbles each. How many marbles?",
]
G = 4
# Completion lengths of the 16 rows (rank 0: rows 0-7, rank 1: rows 8-15); 8 = truncated and
# masked out (mask_truncated): the ranks' token and completion counts differ from half the
# batch's, so normalisers that were not summed over ranks would give another update.
LENGTHS = [8, 8, 3, 5, 8, 2, 8, 8, 1, 4, 6, 7, 8, 6, 5, 3]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2, 0.8, -0.8] * 2)
# CLI runs on 2 processes: 2 prompts per step, one group per rank.
TINY_DDP = (*TINY, "eval.comparison.at_end=false")


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N ARGS` (a free port each time)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


def torchrun_env(env: dict[str, str] | None = None) -> dict[str, str]:
    # A rank running a test file imports conftest, and grpo from this checkout.
    path = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    return {**cli_env(), "PYTHONPATH": path, **(env or {})}


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None, check: bool = True):
    """torchrun for real; the completed process."""
    cmd = torchrun_command(nproc, *args)
    proc = subprocess.run(
        cmd, cwd=REPO, env=torchrun_env(env), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed:\n{output}")
    return proc


def train_on(nproc: int, *overrides: str, env: dict[str, str] | None = None, check: bool = True):
    return torchrun(nproc, "-m", "grpo.train", *TINY_DDP, *overrides, env=env, check=check)


def fixed_batch():
    """The tiny LoRA policy (seed 0) and a global batch of 4 groups with lengths `LENGTHS`."""
    cfg = compose_config("model=tiny", "model.lora.enabled=true", "model.lora.dropout=0.0")
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    torch.manual_seed(1)
    rollout = generate(policy, QUESTIONS, G, max_new_tokens=8)
    t = rollout.completion_ids.shape[1]
    lengths = torch.tensor(LENGTHS).clamp(max=t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return policy, replace(rollout, completion_mask=mask.long(), truncated=lengths == t)


def one_update(strategy: str) -> dict[str, dict]:
    """One SGD step per aggregation on this rank's share of the fixed batch (all of it without
    ranks): the trained weights and the logged statistics, by aggregation."""
    results = {}
    for aggregation in AGGREGATIONS:
        policy, rollout = fixed_batch()
        reference = Reference(policy, 1.0)
        distributed.prepare(policy.model, strategy)
        n = rollout.completion_ids.shape[0] // distributed.world_size()
        mine = take(rollout, slice(distributed.rank() * n, (distributed.rank() + 1) * n))
        params = [p for p in policy.model.parameters() if p.requires_grad]
        loss = GRPOLoss(kl={"coef": 0.5}, aggregation=aggregation)
        optimizer = torch.optim.SGD(params, lr=1.0)
        actor = make_actor(
            policy, loss, reference, optimizer, micro_batch_size=2, mask_truncated=True
        )
        stats = actor.update(mine, distributed.my_rows(ADVANTAGES), actor.score(mine))
        with distributed.gathered(policy.model):
            weights = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        results[aggregation] = {"weights": weights, "stats": stats}
    return results


def assert_same_update(one: dict, many: dict) -> None:
    start, _ = fixed_batch()
    initial = dict(start.model.named_parameters())
    for aggregation in AGGREGATIONS:
        a, b = one[aggregation], many[aggregation]
        moved = max((w - initial[k]).abs().max().item() for k, w in a["weights"].items())
        assert moved > 1e-3, f"{aggregation}: the step changed nothing; the test would be blind"
        for name, weight in a["weights"].items():
            torch.testing.assert_close(b["weights"][name], weight, rtol=1e-5, atol=1e-6)
        assert b["stats"].keys() == a["stats"].keys()
        for key, value in a["stats"].items():
            assert b["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (aggregation, key)


def test_two_ranks_make_the_update_of_one_process_on_the_same_batch(tmp_path):
    out = tmp_path / "ranks.pt"
    torchrun(2, __file__, "update", str(out))  # each rank: one step with DDP, then with FSDP
    ranks = torch.load(out, weights_only=True)
    one = one_update("ddp")  # in this process: no ranks
    for strategy in [s.value for s in Strategy]:
        assert_same_update(one, ranks[strategy])


def test_sampler_ranks_share_the_global_batches_in_order():
    single = GroupedSampler(10, 4, 2, seed=3)
    ranks = [GroupedSampler(10, 4, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # across epochs
        whole = next(single).prompt_indices
        assert [i for s in ranks for i in next(s).prompt_indices] == whole


def test_batch_size_that_the_processes_cannot_share_is_refused(monkeypatch):
    cfg = compose_config("trainer.batch_size=4")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"trainer.batch_size=4: must be a multiple of the 3"):
        validate_config(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg.trainer.micro_batch_size = 16  # 4 prompts x 4 / 2 processes = 8 rows each
    with pytest.raises(ConfigError, match=r"num_responses_per_prompt / 2 processes = 8"):
        validate_config(cfg)


def flat_unless_prime(prompt: int) -> list[float]:
    """Deterministic rewards of a prompt's G = 2 completions: spread only for prime indices."""
    prime = prompt > 1 and all(prompt % d for d in range(2, prompt))
    return [1.0, 0.0] if prime else [1.0, 1.0]


def dynamic_batch(max_extra_rounds: int) -> dict:
    """`sample_groups` with DAPO's dynamic sampling, 4 prompts per step over all ranks, draws
    from the real sampler scored by `flat_unless_prime`; the global batch's prompts, stats and
    every rank's sampler position after 3 steps."""
    sampler = instantiate(
        compose_config().algorithm.sampler,
        num_prompts=40,
        batch_size=4,
        group_size=2,
        seed=7,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )

    def draw() -> ScoredRollout:
        prompts = next(sampler).prompt_indices
        n = len(prompts)
        ids = torch.tensor(prompts)[:, None]
        ones = torch.ones(n, 1, dtype=torch.long)
        rollout = Rollout(ids, ones, ids, ones, torch.zeros(n, dtype=torch.bool), [""] * n, 0)
        rewards = [r for p in prompts[::2] for r in flat_unless_prime(p)]
        rows = [{"question": str(p), "answer": ""} for p in prompts]
        return ScoredRollout(rows, rollout, RewardOutput(rewards, {"r": rewards}))

    steps = []
    for _ in range(3):
        batch, stats = sample_groups(draw, 4, 2, True, max_extra_rounds)
        steps.append({"prompts": [r["question"] for r in batch.rows], "stats": stats})
    return {"steps": steps, "positions": distributed.all_gather(sampler.state_dict())}


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("algorithm.update_epochs=0", "error: algorithm.update_epochs=0: must be >= 1"),
        ("trainer.batch_size=3", "error: trainer.batch_size=3: must be a multiple of the 2"),
    ],
)
def test_a_config_error_under_torchrun_reaches_the_user(tmp_path, override, line):
    """Whichever rank fails first (torchrun then stops the others), its line is printed."""
    proc = train_on(2, override, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert line in proc.stderr, proc.stderr[-2000:]


def test_dynamic_sampling_rounds_are_collective(tmp_path):
    """2 ranks draw the same prompts in the same rounds as one process, and end each step at
    the same sampler position (the rounds depend on the rewards of both ranks' groups)."""
    out = tmp_path / "dynamic.pt"
    torchrun(2, __file__, "dynamic", str(out))
    ranks = torch.load(out, weights_only=True)
    alone = dynamic_batch(max_extra_rounds=3)
    assert ranks["steps"] == alone["steps"]
    assert any(step["stats"]["sampling_rounds"] > 1 for step in alone["steps"])
    assert ranks["positions"][0] == ranks["positions"][1] == alone["positions"][0]


def test_the_defaults_run_under_torchrun_with_two_processes(tmp_path):
    """No override but the tiny model: the default micro-batch is each process's rows."""
    run_dir = tmp_path / "run"
    torchrun(2, "-m", "grpo.train", "model=tiny", f"hydra.run.dir={run_dir}")
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 31))
    assert (run_dir / "comparison.json").is_file()


def test_fsdp_full_fine_tuning_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """FSDP shards every weight of the tiny model over 2 processes; checkpoints are written by
    torch.distributed.checkpoint, each rank its shard. SIGKILL after checkpoint 3, resume."""
    run = (
        "trainer.strategy=fsdp",
        "trainer.max_steps=6",
        "trainer.save_every=1",
        "logging.samples_every=1",
    )
    whole = tmp_path / "whole"
    train_on(2, *run, f"hydra.run.dir={whole}")
    assert len(list((whole / "checkpoints" / "step_000005" / "weights").glob("*.distcp"))) == 2

    run_dir = tmp_path / "run"
    cmd = torchrun_command(2, "-m", "grpo.train", *TINY_DDP, *run, f"hydra.run.dir={run_dir}")
    process = subprocess.Popen(
        cmd, cwd=REPO, env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_000003").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint 3"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks, no handler runs
    process.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    assert 3 <= int(list_checkpoints(run_dir)[-1].name[5:]) < 6
    train_on(2, *run, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert compare_metrics(whole, run_dir) == []
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 7))
    assert (run_dir / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()


def test_two_process_run_finishes_and_only_rank_0_writes(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = train_on(2, f"paths.output_root={tmp_path / 'outputs'}", env={"TMPDIR": str(scratch)})
    (run_dir,) = (tmp_path / "outputs").glob("*/*")  # one run folder, not one per rank
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["group_stats/num_groups"] == 2 for m in lines[1:])  # both ranks' groups
    assert "eval/accuracy_strict" in lines[-1]
    assert (run_dir / "model").is_dir() and (run_dir / "summary.json").is_file()
    assert proc.stdout.count("held-out results") == 1  # printed by rank 0 alone
    assert list(scratch.glob("grpo-rank*")) == []  # rank 1's temporary Hydra folder is gone


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node7", "node7"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("cpu1,gpu[003-005]", "cpu1"),
        ("a[1,4-6]b", "a1b"),
    ],
)
def test_the_rendezvous_is_the_first_host_of_the_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_slurm_tasks_without_torchrun_train_as_torchrun_ranks_do(tmp_path):
    """Two processes started as `srun` starts them (SLURM_* variables, no RANK): the same run
    as torchrun's two ranks, metrics equal, rank 0 the one writer."""
    runs = {name: tmp_path / name for name in ("torchrun", "slurm")}
    train_on(2, f"hydra.run.dir={runs['torchrun']}")
    env = {k: v for k, v in torchrun_env().items() if k not in ("RANK", "WORLD_SIZE")}
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242"}
    cmd = [sys.executable, "-m", "grpo.train", *TINY_DDP, f"hydra.run.dir={runs['slurm']}"]
    tasks = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, **job, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert compare_metrics(runs["torchrun"], runs["slurm"]) == []
    assert sum(out.count("held-out results") for out in outputs) == 1  # rank 0 alone


@pytest.mark.slow
def test_resumed_two_process_run_continues_the_same_way(tmp_path):
    run_dir = tmp_path / "run"
    run = ("trainer.max_steps=4", "trainer.save_every=2", "logging.samples_every=1")
    train_on(2, *run, f"hydra.run.dir={run_dir}")
    whole = tmp_path / "whole"
    shutil.copytree(run_dir, whole)
    checkpoint = run_dir / "checkpoints" / "step_000002"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert len(state["other_ranks"]) == 1  # rank 1's sampler and RNG
    assert state["other_ranks"][0]["rng"]["torch"].ne(state["rng"]["torch"]).any()
    train_on(2, *run, f"trainer.resume={checkpoint}", f"hydra.run.dir={run_dir}")
    assert compare_metrics(whole, run_dir) == []
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]  # each step once
    assert (run_dir / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()
    alone = torchrun(
        1, "-m", "grpo.train", *TINY_DDP, *run, "trainer.resume=auto", f"hydra.run.dir={run_dir}",
        check=False,
    )  # fmt: skip
    assert alone.returncode != 0
    assert "written by 2 processes; resume it with as many (now 1)" in alone.stderr


def test_fsdp_lora_run_on_two_processes_saves_the_whole_adapter(tmp_path):
    run_dir = tmp_path / "run"
    train_on(2, "trainer.strategy=fsdp", "model.lora.enabled=true", f"hydra.run.dir={run_dir}")
    config = json.loads((run_dir / "model" / "adapter_config.json").read_text())
    assert config["r"] == 16
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(run_dir / "model")  # whole tensors, not shards
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


if __name__ == "__main__":  # a rank started by torchrun: `update` or `dynamic`, then OUT
    distributed.init("cpu")
    if sys.argv[1] == "update":
        result = {strategy: one_update(strategy) for strategy in [s.value for s in Strategy]}
    else:
        result = dynamic_batch(max_extra_rounds=3)
    if distributed.is_main():
        torch.save(result, sys.argv[2])
