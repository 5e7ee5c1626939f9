"""Shared test helpers: the repo paths, the local GSM8K copy, running the real CLI, and small
models (the tiny config's policy, random Llama/Qwen2/Qwen3 models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
CONF_DIR = REPO / "conf"


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


# Overrides that make a tiny CLI run fast: a small model, few steps, short completions.
TINY = (
    "model=tiny",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "algorithm.num_responses_per_prompt=2",
    "trainer.micro_batch_size=4",
    "trainer.max_new_tokens=8",
    "data.num_train=32",
    "data.num_test=4",
    "logging.progress_bar=false",
)


@pytest.fixture
def tiny_run(tmp_path):
    """Run the CLI on the tiny model into a fresh folder; returns (run_dir, process)."""

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


def random_model(kind: str, kv_heads: int, eos: int = EOS):
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
    return model_cls(config).eval()


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
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", f"model.lora.enabled={lora}"])
    torch.manual_seed(0)
    return instantiate(cfg.model)


QUESTIONS = ["Ava has 3 apples and gets 4 more. How many?", "Ben buys 2 bags of 5 pens each."]
