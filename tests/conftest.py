"""Shared test helpers: the repo paths, the real configs composed, training runs in-process and
through the real CLI, the local GSM8K copy, and small models (the tiny config's policy, random
Llama/Qwen2/Qwen3 models)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import grpo.run.config  # noqa: F401  (registers the config schema)
from grpo.actor.update import Actor, UpdateSettings
from grpo.algorithm.loss import GRPOLoss
from grpo.batch import Rollout
from grpo.rollout import kernels, lean
from grpo.rollout.backends import BACKENDS
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import render_prompts, tokenize_prompts
from grpo.train import train

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# GSM8K (MIT) is not in the repo: GRPO_GSM8K_DIR, or ../shared/data/gsm8k beside the clone (CI).
GSM8K_ENV = "GRPO_GSM8K_DIR"


def gsm8k_path() -> Path | None:
    """The folder with GSM8K's train.jsonl and test.jsonl, if this machine has one."""
    folder = Path(os.environ.get(GSM8K_ENV, REPO.parent / "shared" / "data" / "gsm8k"))
    return folder if (folder / "train.jsonl").is_file() else None


@pytest.fixture
def gsm8k_dir() -> Path:
    """GSM8K's local folder; the test is skipped without one (and fails under CI=true)."""
    folder = gsm8k_path()
    if folder is None:
        how = (
            f"GSM8K not found: set {GSM8K_ENV}=DIR (DIR/train.jsonl, DIR/test.jsonl from "
            "openai/gsm8k) or put it at ../shared/data/gsm8k"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(how + " (CI=true: these tests must run)")
        pytest.skip(how)
    return folder


def compose_config(*overrides: str) -> DictConfig:
    """`conf/train.yaml` composed with `overrides`, as the CLI composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one torch thread, offline, quiet."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_train(*overrides: str, cwd: Path = REPO, check: bool = True, timeout: int = 600):
    """Run `python -m grpo.train OVERRIDES` for real; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "grpo.train", *overrides]
    proc = subprocess.run(
        cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl as a list of dicts."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_lines(run_dir: Path) -> list[dict]:
    """The lines of metrics.jsonl that are optimiser steps."""
    return [m for m in read_metrics(run_dir) if "train/total_loss" in m]


# Overrides that make a tiny run fast: a small model, few steps, short completions.
TINY = (
    "model=tiny",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "algorithm.num_responses_per_prompt=2",
    "rollout.max_new_tokens=8",
    "task.num_train=32",
    "task.num_test=4",
    "logging.progress_bar=false",
)


def require_vllm() -> None:
    """Skip the test without vLLM (`make install-vllm`); under CI=true, which installs it, fail."""
    from grpo.rollout import vllm_engine

    if not vllm_engine.available():
        if os.environ.get("CI") == "true":
            pytest.fail("vLLM is not installed (CI=true: `make install-vllm` must run first)")
        pytest.skip("vLLM is not installed: `make install-vllm`")


@pytest.fixture
def tiny_train(tmp_path):
    """Train the tiny model in this process into a fresh folder; returns (run_dir, objective).

    Extra overrides follow TINY. One torch thread, as the CLI tests use."""

    def run(*overrides: str, name: str = "run"):
        cfg = compose_config(*TINY, *overrides)
        run_dir = tmp_path / name
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_dir, train(cfg, run_dir)
        finally:
            torch.set_num_threads(threads)

    return run


@pytest.fixture
def tiny_run(tmp_path):
    """Run the real CLI on the tiny model into a fresh folder; returns (run_dir, process)."""

    def run(*overrides: str, check: bool = True):
        run_dir = tmp_path / "run"
        proc = run_train(*TINY, f"hydra.run.dir={run_dir}", *overrides, check=check)
        return run_dir, proc

    return run


EOS, PAD, VOCAB = 2, 3, 300
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def random_model(kind: str, kv_heads: int, eos: int = EOS, dtype: torch.dtype = torch.float32):
    """A random 2-layer model of architecture `kind` (GQA when kv_heads < 4 heads)."""
    config_cls, model_cls = ARCHITECTURES[kind]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        eos_token_id=eos,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    return model_cls(config).to(dtype).eval()


def built_kernel(name: str):
    """`grpo.rollout.kernels.load(name)`, or skip the test where `<name>.cpp` does not build."""
    kernel = kernels.load(name)
    if kernel is None:
        pytest.skip(f"{name}.cpp does not build on this machine (no AVX2 or no compiler)")
    return kernel


def lean_sample(model, ids, mask, max_new_tokens: int, eos: int = EOS, n: int = 1, **sampling):
    """`grpo.rollout.lean.sample` for a model without a tokenizer (EOS `eos`, padding PAD);
    `sampling` are `SamplingSettings` fields."""
    settings = SamplingSettings(max_new_tokens, ids.shape[1], **sampling)
    special = SimpleNamespace(eos_token_id=eos, pad_token_id=PAD)
    return lean.sample(model, special, ids, mask, n, settings)


def prompt_batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Six left-padded prompts (rows 0 and 2 padded when `padded`)."""
    torch.manual_seed(1)
    ids = torch.randint(4, VOCAB, (6, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def tiny_policy(lora: bool = False):
    """The `model=tiny` config's policy (seeded), with or without LoRA."""
    cfg = compose_config("model=tiny", f"model.lora.enabled={lora}")
    torch.manual_seed(0)
    return instantiate(cfg.model)


def tiny_task(**settings):
    """A small arithmetic task, as `task=arithmetic` builds it."""
    cfg = compose_config("task.num_train=32", "task.num_test=4")
    return instantiate(cfg.task, **settings)


QUESTIONS = ["Ava has 3 apples and gets 4 more. How many?", "Ben buys 2 bags of 5 pens each."]


def float32_tolerance(want: torch.Tensor, terms: int) -> float:
    """An absolute tolerance for float32 results that two kernels may sum in different orders:
    `terms` roundings of float32 epsilon, each at most the largest magnitude in `want`. It
    comes from the arithmetic, not from one machine's output (AVX2 and AVX-512 differ)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    return terms * torch.finfo(torch.float32).eps * max(scale, 1e-30)


ROWS = 8  # the `rollout` fixture's completions: 2 prompts x G = 4
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, -1.0, 1.0, -0.5, 0.5])


def generate(
    policy, prompts: list[str], n: int = 1, backend: str = "lean", engine=None, **sampling
) -> Rollout:
    """`n` completions of each prompt text with backend `backend` (or a built `engine`), the
    way the rollout source tokenizes them; `sampling` are `SamplingSettings` fields
    (max_new_tokens 64 and max_prompt_length 256 unless given)."""
    settings = SamplingSettings(**{"max_new_tokens": 64, "max_prompt_length": 256, **sampling})
    device = next(policy.model.parameters()).device
    ids, mask = tokenize_prompts(policy.tokenizer, prompts, settings.max_prompt_length, device)
    engine = engine or BACKENDS[backend](policy, settings)
    return engine.generate(ids, mask, n, settings)


@pytest.fixture(scope="module")
def rollout():
    """8 completions (2 prompts x G = 4) of up to 6 tokens from the tiny policy."""
    policy = tiny_policy()
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    torch.manual_seed(1)
    return generate(policy, prompts, 4, max_new_tokens=6)


def trajectories(rollout: Rollout, env_at_end: bool = False) -> Rollout:
    """The `rollout` fixture's prompts with two-turn trajectories of 7 to 12 tokens: a model
    turn, 3 environment tokens (a tool's output: `loss_mask` 0) and a second model turn, or
    with `env_at_end` the environment's 3 tokens last. Random token ids: the loss does not
    care whether the model sampled them."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([12, 9, 12, 7, 10, 12, 8, 11])
    positions = torch.arange(12)[None]
    mask = (positions < lengths[:, None]).long()
    ids = torch.randint(4, VOCAB, mask.shape, generator=gen)
    start = lengths - 3 if env_at_end else torch.tensor([2, 3, 4, 2, 3, 4, 2, 3])
    env = (positions >= start[:, None]) & (positions < start[:, None] + 3)
    return dataclasses.replace(
        rollout,
        completion_ids=ids.masked_fill(mask == 0, rollout.pad_token_id),
        completion_mask=mask,
        truncated=torch.zeros(ROWS, dtype=torch.bool),
        loss_mask=mask * ~env,
    )


def make_actor(policy, loss=None, reference=None, optimizer=None, **settings) -> Actor:
    """An `Actor` on `policy` (AdamW lr 1e-2 unless given) with `UpdateSettings` fields
    `settings` (temperature 1, micro-batches of 4, no clipping unless given)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-2)
    defaults = {
        "temperature": 1.0,
        "micro_batch_size": 4,
        "micro_batch_tokens": None,
        "share_prompts": True,
        "max_grad_norm": None,
    }
    merged = {**defaults, **settings}
    merged.setdefault("inference_batch_size", merged["micro_batch_size"])
    merged.setdefault("need_old", merged.get("epochs", 1) * merged.get("num_mini_batches", 1) > 1)
    return Actor(
        policy, reference, loss or GRPOLoss(kl={"coef": 0.0}), optimizer, UpdateSettings(**merged)
    )


def update(
    policy,
    rollout,
    *,
    lr=1e-2,
    optimizer=torch.optim.AdamW,
    advantages=ADVANTAGES,
    loss=None,
    reference=None,
    micro_batch_size=4,
    inference_batch_size=None,
    **settings,
):
    """The trainer's steps 4 and 5 on `rollout`: no-grad log-probs, then the policy update
    (max_grad_norm 1 unless given)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    actor = make_actor(
        policy,
        loss,
        reference,
        optimizer(params, lr=lr),
        micro_batch_size=micro_batch_size,
        inference_batch_size=inference_batch_size or micro_batch_size,
        **{"max_grad_norm": 1.0, **settings},
    )
    return actor.update(rollout, advantages, actor.score(rollout))


def snapshot(policy) -> list[torch.Tensor]:
    """Copies of every parameter of the policy."""
    return [p.detach().clone() for p in policy.model.parameters()]
