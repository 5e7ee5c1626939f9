"""Every config group option composes, and the cheap ones instantiate; bad keys fail early."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, GSM8K_DIR, run_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from grpo.loss import GRPOLoss
from grpo.rewards import Reward
from grpo.sampler import GroupedSampler


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_default_config_is_the_offline_smollm2_quickstart_stack():
    cfg = compose_train()
    assert cfg.model.checkpoint._target_ == "grpo.modeling.smollm2_checkpoint"
    assert cfg.model.lora.enabled and cfg.model.lora.r == 16 and cfg.model.lora.alpha == 32
    assert cfg.data._target_ == "grpo.data.ArithmeticDataset"
    assert cfg.algorithm.clip_ratio == 0.2 and cfg.algorithm.loss.clip_ratio == 0.2


@pytest.mark.parametrize("option", options("algorithm"))
def test_algorithm_options_build_loss_and_sampler(option):
    cfg = compose_train(f"algorithm={option}")
    assert isinstance(instantiate(cfg.algorithm.loss), GRPOLoss)
    sampler = instantiate(cfg.algorithm.sampler, num_prompts=10, batch_size=2, seed=0)
    assert isinstance(sampler, GroupedSampler)
    assert sampler.group_size == cfg.algorithm.num_responses_per_prompt


@pytest.mark.parametrize("option", options("reward"))
def test_reward_options_score_text(option):
    reward = instantiate(compose_train(f"reward={option}").reward)
    assert isinstance(reward, Reward)
    out = reward(["2 + 3 = 5\n#### 5", "no idea"], ["#### 5", "#### 5"], [6, 2])
    assert out.total[0] > out.total[1]


def test_seed_override_names_reach_the_loss_and_sampler():
    cfg = compose_train(
        "algorithm.clip_ratio=0.1", "algorithm.kl_coef=0.0", "algorithm.num_responses_per_prompt=8"
    )
    loss = instantiate(cfg.algorithm.loss)
    assert (loss.clip_low, loss.clip_high, loss.kl_coef) == (0.1, 0.1, 0.0)
    assert instantiate(cfg.algorithm.sampler, num_prompts=4, batch_size=1).group_size == 8


def test_data_options_instantiate():
    arithmetic = instantiate(compose_train("data=arithmetic").data)
    assert len(arithmetic.train) == 2000 and len(arithmetic.test) == 64
    gsm8k = instantiate(compose_train("data=gsm8k", f"data.path={GSM8K_DIR}").data)
    assert len(gsm8k.train) == 7473 and len(gsm8k.test) == 200


@pytest.mark.parametrize("option", options("model"))
def test_model_options_compose_with_lora_4bit_and_tokenizer_sections(option):
    cfg = compose_train(f"model={option}")
    for key in ("lora", "load_in_4bit", "dtype", "gradient_checkpointing", "tokenizer"):
        assert key in cfg.model, f"model/{option}.yaml lacks {key}"


@pytest.mark.parametrize("option", options("experiment"))
def test_experiments_compose(option):
    cfg = compose_train(f"experiment={option}")
    assert cfg.trainer.max_steps >= 1


def test_gsm8k_recipe_composes_from_the_cli():
    proc = run_train("experiment=gsm8k_qwen_lora", f"data.path={GSM8K_DIR}", "--cfg", "job")
    assert "Qwen/Qwen2.5-0.5B" in proc.stdout and "load_in_4bit: true" in proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
        ("model=no_such_model", "Could not find 'model/no_such_model'"),
    ],
)
def test_unknown_key_or_option_fails_before_any_model_loads(override, message):
    proc = run_train(override, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout
