"""`scripts/export.py` (grpo/run/export.py): a tiny LoRA run, a tiny full fine-tuning run and a tiny
4-bit (QLoRA) run exported; each export loads with plain transformers (no peft) and gives the
same greedy completions, with the same token log-probs, as the run's own policy loaded the way
scripts/compare_models.py loads it, on 4 held-out prompts; the LoRA and full exports load in
`vllm.LLM` (CPU) with the same greedy tokens. Also: the dtype, the model card, the tokenizer's
chat template, and the push up to huggingface_hub's calls (no network here: the API is faked).
vLLM's CPU attention needs head_dim >= 32, so the tiny model has 2 heads of 32."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, compose_config, generate, require_vllm, run_train
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.actor.logprobs import token_logprobs
from grpo.model.loading import Policy
from grpo.rollout import vllm_engine
from grpo.rollout.source import render_prompts
from grpo.run import export
from grpo.train import train

RUN = (
    *TINY,
    # The tiny model earns no reward (advantages 0): an entropy bonus gives the update a
    # gradient, and large steps take the trained model far from the base.
    "algorithm.loss.entropy_coef=0.1",
    "trainer.learning_rate=0.05",
    "eval.comparison.at_end=false",
    "logging.plots=false",
)
MAX_NEW_TOKENS = 12


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_here(run_dir: Path, *overrides: str) -> Path:
    """A tiny run in this process (one torch thread), into `run_dir`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_config(*RUN, *overrides), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A LoRA run through the real CLI (its .hydra/ and overrides feed the model card)."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    run_train(*RUN, "model.lora.enabled=true", f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return train_here(tmp_path_factory.mktemp("full") / "run", "model.lora.enabled=false")


def run_policy(run_dir: Path) -> Policy:
    """The run's trained policy as scripts/compare_models.py loads it (adapters on the base)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return load_script("compare_models").load_trained(cfg, run_dir / "model", "cpu")


def exported_policy(folder: Path, like: Policy) -> Policy:
    """The exported folder through plain transformers (no peft, no project code)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return Policy(model, tokenizer, like.use_chat_template, False, str(folder))


def held_out_prompts(run_dir: Path, policy: Policy) -> list[str]:
    """The run's first 4 held-out problems, rendered as the run rendered them."""
    task = instantiate(OmegaConf.load(run_dir / "config.yaml").task)
    return render_prompts(policy.tokenizer, task, task.test[:4], policy.use_chat_template)


def greedy(policy: Policy, prompts: list[str]):
    """Greedy completions (transformers' generate) and each completion token's log-prob."""
    rollout = generate(
        policy, prompts, backend="transformers", do_sample=False, max_new_tokens=MAX_NEW_TOKENS
    )
    with torch.no_grad():
        logprobs, _ = token_logprobs(policy.model, rollout, 1.0)
    return rollout, logprobs


def completions(rollout) -> list[list[int]]:
    return [
        ids[m.bool()].tolist()
        for ids, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
    ]


def assert_same_policy(run_dir: Path, folder: Path, atol: float = 1e-5) -> None:
    """The export's greedy completions and log-probs equal the run's policy's."""
    trained = run_policy(run_dir)
    exported = exported_policy(folder, trained)
    prompts = held_out_prompts(run_dir, trained)
    assert prompts == held_out_prompts(run_dir, exported)  # the same tokenizer, the same text
    ours, ours_logp = greedy(trained, prompts)
    theirs, theirs_logp = greedy(exported, prompts)
    assert completions(ours) == completions(theirs)
    mask = ours.completion_mask.bool()
    torch.testing.assert_close(theirs_logp[mask], ours_logp[mask], atol=atol, rtol=0)
    with torch.no_grad():  # and the run changed the model: the base gives other log-probs
        cfg = OmegaConf.load(run_dir / "config.yaml")
        base = AutoModelForCausalLM.from_pretrained(export.base_checkpoint(cfg))
        base_logp, _ = token_logprobs(base, ours, 1.0)
    assert (base_logp[mask] - ours_logp[mask]).abs().max() > 1e-2


def test_a_lora_export_is_the_runs_policy_without_peft(lora_run, tmp_path):
    folder = export.export_run(lora_run, tmp_path / "export")
    assert not list(folder.glob("adapter*")), "adapters are merged, not shipped"
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert_same_policy(lora_run, folder)


def test_a_full_fine_tuning_export_is_the_runs_policy(full_run, tmp_path):
    folder = export.export_run(full_run, tmp_path / "export")
    assert_same_policy(full_run, folder)
    card = (folder / "README.md").read_text()
    assert "Full fine-tuning" in card and "LoRA" not in card


def test_a_4bit_run_exports_its_dequantized_weights(tmp_path):
    run_dir = train_here(tmp_path / "run", "model.lora.enabled=true", "model.load_in_4bit=true")
    folder = export.export_run(run_dir, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    card = (folder / "README.md").read_text()
    assert "de-quantized NF4 weights" in card and "4-bit NF4 base, QLoRA" in card
    # bitsandbytes' CPU 4-bit products round differently from an fp32 product with the same
    # de-quantized weights, by instruction set: up to 4.7e-4 in a log-prob on an AVX-512 EPYC
    # (under 1e-4 on an AVX2 one); the run itself moved them by more than 1e-2 (checked below)
    assert_same_policy(run_dir, folder, atol=2e-3)


def vllm_greedy(folder: Path, prompt_ids: list[list[int]]):
    """Greedy tokens of `vllm.LLM(model=folder)` and each one's log-prob (the engine in this
    process, a small KV cache; its seeding and thread side effects undone as the training
    backend undoes them)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams, TokensPrompt

    with vllm_engine._undone_side_effects():
        llm = LLM(
            model=str(folder),
            dtype="float32",  # the export's: vLLM's "auto" downcasts float32 models to 16 bits
            max_model_len=256,
            kv_cache_memory_bytes=2**25,
            enforce_eager=True,
            seed=0,
        )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = [
        lp[t].logprob
        for out, ids in zip(outputs, tokens, strict=True)
        for lp, t in zip(out.outputs[0].logprobs, ids, strict=True)
    ]
    return tokens, torch.tensor(logprobs)


def test_lora_and_full_exports_load_in_vllm_with_the_same_greedy_tokens(
    lora_run, full_run, tmp_path
):
    require_vllm()
    for name, run_dir in (("lora", lora_run), ("full", full_run)):
        folder = export.export_run(run_dir, tmp_path / name)
        trained = run_policy(run_dir)
        prompts = held_out_prompts(run_dir, trained)
        ours, ours_logp = greedy(trained, prompts)
        prompt_ids = [
            ids[m.bool()].tolist() for ids, m in zip(ours.prompt_ids, ours.prompt_mask, strict=True)
        ]
        tokens, logprobs = vllm_greedy(folder, prompt_ids)
        assert tokens == completions(ours), name
        mask = ours.completion_mask.bool()
        torch.testing.assert_close(logprobs, ours_logp[mask], atol=1e-4, rtol=0)


def test_bf16_export_from_the_command_line_and_its_model_card(lora_run, tmp_path, capsys):
    cli = load_script("export")
    out = tmp_path / "bf16"
    assert cli.main([str(lora_run), "--out", str(out), "--dtype", "bf16"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16

    card = (out / "README.md").read_text()
    summary = json.loads((lora_run / "summary.json").read_text())
    info = json.loads((lora_run / "run_info.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    for expected in (
        "tiny_checkpoint",  # the base model
        "`arithmetic` task",
        "| algorithm | `grpo` |",
        "| policy loss | `clip` |",
        "| optimiser steps | 2 |",
        "LoRA adapters (r=16, alpha=32",
        "Weights in bf16",
        f"git commit `{info['code']['commit']}`",
    ):
        assert expected in card, expected
    for key, before in summary["before"].items():
        assert f"| {key} | {before:.3f} | {summary['after'][key]:.3f} |" in card
    (command,) = [line for line in card.splitlines() if line.startswith("python -m grpo.train")]
    assert "model.lora.enabled=true" in command and "hydra.run.dir" not in command

    # A folder that holds files is never overwritten; a folder that is no run is named.
    assert cli.main([str(lora_run), "--out", str(out)]) == 2
    assert cli.main([str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a grpo run folder" in capsys.readouterr().err


def test_the_tokenizer_and_its_chat_template_travel(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(run_dir / "model")
    folder = export.export_run(run_dir, tmp_path / "export")
    exported = AutoTokenizer.from_pretrained(folder)
    assert exported.chat_template == template
    text = "12 + 7 = ?"
    assert exported(text).input_ids == tokenizer(text).input_ids


class FakeHub:
    """huggingface_hub.HfApi as export.push_to_hub uses it: records the calls, sends nothing."""

    calls: list = []

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeHub.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://hub/{kwargs['repo_id']}/commit/1"})()


def test_push_creates_the_repo_and_uploads_the_folder(lora_run, tmp_path, monkeypatch, capsys):
    """Everything up to huggingface_hub's upload: the calls and their arguments (the upload
    itself needs the network and an account, so it is not run here)."""
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    out = tmp_path / "export"
    argv = [str(lora_run), "--out", str(out), "--push-to-hub", "me/tiny-grpo", "--private"]
    assert load_script("export").main(argv) == 0
    assert FakeHub.calls[:2] == [
        ("init", None),  # the user's own login: no token is passed or stored
        ("create_repo", "me/tiny-grpo", {"repo_type": "model", "private": True, "exist_ok": True}),
    ]
    upload = FakeHub.calls[2][1]
    assert upload["folder_path"] == str(out) and upload["repo_id"] == "me/tiny-grpo"
    assert upload["repo_type"] == "model"
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert "pushed to me/tiny-grpo: https://hub/me/tiny-grpo/commit/1" in capsys.readouterr().out
