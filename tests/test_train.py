"""The train entrypoint end to end on the tiny model, in this process (and once through the
CLI): run folders, which weights move, variants, determinism, the GSM8K recipe."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    compose_config,
    generate,
    make_actor,
    read_metrics,
    step_lines,
    tiny_policy,
    tiny_task,
)
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.actor.logprobs import token_logprobs
from grpo.actor.reference import Reference
from grpo.algorithm.advantages import estimate_advantages
from grpo.rollout.source import render_prompts
from grpo.run.build import build_loss
from grpo.train import train


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


def test_the_cli_writes_a_complete_run_folder(tiny_run):
    run_dir, proc = tiny_run("trainer.max_steps=3")
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert "eval/accuracy_strict" in lines[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"])
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "held-out results" in proc.stdout
    AutoModelForCausalLM.from_pretrained(run_dir / "model")
    AutoTokenizer.from_pretrained(run_dir / "model")


def start_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_policy().model.state_dict().items()}


def test_full_fine_tuning_moves_the_weights(tiny_train):
    # The untrained tiny model is never right: an entropy bonus gives the gradient.
    run_dir, objective = tiny_train("trainer.learning_rate=1e-2", "algorithm.loss.entropy_coef=0.5")
    assert objective == json.loads((run_dir / "summary.json").read_text())["eval/accuracy_strict"]
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    start = start_weights()
    moved = [k for k in start if not torch.equal(trained[k], start[k])]
    assert moved and "model.layers.0.self_attn.q_proj.weight" in moved


def test_lora_moves_only_the_adapters_and_the_base_reference_stays(tiny_train):
    run_dir, _ = tiny_train(
        "model.lora.enabled=true", "trainer.learning_rate=1e-2", "algorithm.loss.entropy_coef=0.5"
    )
    adapter = load_file(run_dir / "model" / "adapter_model.safetensors")
    assert all("lora_" in name for name in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    # The reference is the base with the adapters off: the base weights the run loads again.
    lines = step_lines(run_dir)
    assert lines[0]["train/kl_mean"] == 0.0 < lines[-1]["train/kl_mean"]


@pytest.mark.parametrize(
    "variant",
    [
        ("model.lora.enabled=true", "model.load_in_4bit=true"),
        ("algorithm.kl.coef=0.0",),
        ("algorithm.kl.in_reward=true", "algorithm.kl.estimator=k1"),
    ],
    ids=["qlora-4bit", "full-no-kl", "kl-in-reward"],
)
def test_variants_train(tiny_train, variant):
    run_dir, _ = tiny_train(*variant, "eval.comparison.at_end=false")
    lines = step_lines(run_dir)
    assert len(lines) == 2
    assert all(torch.isfinite(torch.tensor(m["train/total_loss"])) for m in lines)
    assert (run_dir / "model").is_dir()


def test_same_config_and_seed_give_identical_metrics(tiny_train):
    first, _ = tiny_train("seed=3", name="first")
    second, _ = tiny_train("seed=3", name="second")
    assert without_timing(read_metrics(second)) == without_timing(read_metrics(first))


def test_gsm8k_recipe_trains_two_steps_on_the_real_files(tmp_path, gsm8k_dir):
    cfg = compose_config(
        "experiment=gsm8k_qwen_lora",
        f"task.path={gsm8k_dir}",
        "model=tiny",
        "model.lora.enabled=true",
        "model.load_in_4bit=false",
        "model.gradient_checkpointing=false",
        "trainer.device=cpu",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "rollout.max_new_tokens=8",
        "rollout.max_prompt_length=96",
        "task.max_train_samples=16",
        "task.max_test_samples=4",
        "logging.progress_bar=false",
    )
    train(cfg, tmp_path / "run")
    assert len(step_lines(tmp_path / "run")) == 2


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_an_update_changes_trainable_weights_only_and_never_the_reference(lora):
    cfg = compose_config("model=tiny", f"model.lora.enabled={lora}")
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    rollout = generate(policy, prompts, 4, max_new_tokens=6)
    advantages = estimate_advantages({"name": "grpo"}, torch.arange(8.0) % 3, 4)
    reference = Reference(policy, 1.0)
    ref_before = reference(rollout)
    params = dict(policy.model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], 1e-2)
    actor = make_actor(
        policy, build_loss(cfg), reference, optimizer, micro_batch_size=8, max_grad_norm=1.0
    )
    actor.update(rollout, advantages, actor.score(rollout))
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert changed and changed <= trainable
    if lora:
        assert all("lora_" in name for name in changed)
    assert torch.equal(reference(rollout), ref_before)
    policy_logp, _ = token_logprobs(policy.model.eval(), rollout)
    assert not torch.allclose(policy_logp, ref_before)
