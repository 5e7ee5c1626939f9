"""The train entrypoint end to end on the tiny model: run folders, weights, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, GSM8K_DIR, read_metrics, run_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from grpo.advantages import group_advantages
from grpo.logprobs import token_logprobs
from grpo.rollout import generate, render_prompts
from grpo.update import make_reference, policy_update


def step_lines(run_dir):
    return [m for m in read_metrics(run_dir) if "train/total_loss" in m]


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


def test_three_steps_write_a_complete_run_folder(tiny_run):
    run_dir, proc = tiny_run("trainer.max_steps=3")
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert "eval/accuracy_strict" in lines[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"])
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "held-out results" in proc.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "model")
    AutoTokenizer.from_pretrained(run_dir / "model")


@pytest.mark.parametrize(
    "variant",
    [
        ("model.lora.enabled=true",),
        ("model.lora.enabled=true", "model.load_in_4bit=true"),
        ("model.lora.enabled=false", "algorithm.kl_coef=0.0"),
    ],
    ids=["lora", "qlora-4bit", "full-no-kl"],
)
def test_cli_variants_train(tiny_run, variant):
    run_dir, _ = tiny_run(*variant)
    lines = step_lines(run_dir)
    assert len(lines) == 2
    assert all(torch.isfinite(torch.tensor(m["train/total_loss"])) for m in lines)
    assert (run_dir / "model").is_dir()


def test_same_config_and_seed_give_identical_metrics(tmp_path, tiny_run):
    first, _ = tiny_run("seed=3")
    a = without_timing(read_metrics(first))
    first.rename(tmp_path / "first")
    second, _ = tiny_run("seed=3")
    assert without_timing(read_metrics(second)) == a


def test_gsm8k_recipe_trains_two_steps_on_the_real_files(tmp_path):
    run_dir = tmp_path / "run"
    run_train(
        "experiment=gsm8k_qwen_lora",
        f"data.path={GSM8K_DIR}",
        f"hydra.run.dir={run_dir}",
        "model=tiny",
        "model.lora.enabled=true",
        "model.load_in_4bit=false",
        "model.gradient_checkpointing=false",
        "trainer.device=cpu",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "trainer.micro_batch_size=8",
        "trainer.max_new_tokens=8",
        "trainer.max_prompt_length=96",
        "data.max_train_samples=16",
        "data.max_test_samples=4",
        "logging.progress_bar=false",
    )
    assert len(step_lines(run_dir)) == 2


def build(*overrides: str):
    """Compose the real config and build policy, loss and a scored rollout, in process."""
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny", "data.num_train=8", *overrides])
    policy = instantiate(cfg.model)
    data = instantiate(cfg.data)
    prompts = render_prompts(policy.tokenizer, [r["question"] for r in data.train[:2]], False)
    rollout = generate(policy.model, policy.tokenizer, prompts, 4, max_new_tokens=6)
    rewards = torch.arange(8, dtype=torch.float32) % 3
    return cfg, policy, rollout, group_advantages(rewards, 4)


def one_update(cfg, policy, rollout, advantages, reference):
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], 1e-2)
    loss_fn = instantiate(cfg.algorithm.loss)
    return policy_update(policy, rollout, advantages, loss_fn, optimizer, reference, 8, 1.0, 1.0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_update_changes_trainable_weights_only_and_never_the_reference(lora):
    cfg, policy, rollout, advantages = build(f"model.lora.enabled={lora}")
    reference = make_reference(policy, 1.0)
    ref_before = reference(rollout)
    params = dict(policy.model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    one_update(cfg, policy, rollout, advantages, reference)
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert changed and changed <= trainable
    if lora:
        assert all("lora_" in name for name in changed)
    assert torch.equal(reference(rollout), ref_before)
    policy_logp, _ = token_logprobs(policy.model.eval(), rollout)
    assert not torch.allclose(policy_logp, ref_before)
