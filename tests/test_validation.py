"""Bad input stops early with a message naming the key: config values, unknown keys, rewards."""

from __future__ import annotations

import math
import re

import pytest
from conftest import CONF_DIR, TINY, run_train
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from grpo.rewards import Reward
from grpo.validation import ConfigError, validate_config


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_default_config_is_valid():
    validate_config(compose_train())
    validate_config(compose_train(*TINY))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "algorithm.num_responses_per_prompt=1",
            "algorithm.num_responses_per_prompt=1: must be >=",
        ),
        ("algorithm.clip_ratio=0.0", "algorithm.clip_ratio=0.0: must be in (0, 1)"),
        ("algorithm.clip_ratio=1.5", "algorithm.clip_ratio=1.5: must be in (0, 1)"),
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef=-0.1: must be >= 0"),
        ("trainer.learning_rate=0.0", "trainer.learning_rate=0.0: must be > 0"),
        ("trainer.learning_rate=-1e-5", "trainer.learning_rate=-1e-05: must be > 0"),
        ("trainer.batch_size=0", "trainer.batch_size=0: must be >= 1"),
        ("trainer.micro_batch_size=3", "trainer.micro_batch_size=3: must divide trainer.batch"),
        ("trainer.max_new_tokens=0", "trainer.max_new_tokens=0: must be > 0"),
        ("trainer.eval_max_new_tokens=-1", "trainer.eval_max_new_tokens=-1: must be > 0"),
        ("trainer.max_prompt_length=0", "trainer.max_prompt_length=0: must be > 0"),
        ("trainer.max_steps=0", "trainer.max_steps=0: must be >= 1"),
        ("trainer.temperature=0.0", "trainer.temperature=0.0: must be > 0"),
        ("trainer.top_p=1.5", "trainer.top_p=1.5: must be in (0, 1]"),
        ("trainer.save_every=-1", "trainer.save_every=-1: must be >= 0"),
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0: must be >= 1"),
        ("trainer.num_threads=0", "trainer.num_threads=0: null or >= 1"),
        ("trainer.resume=/no/such/run", "trainer.resume='/no/such/run': null, auto, or an"),
        ("trainer.device=tpu", "trainer.device='tpu': auto|cpu|cuda"),
        ("trainer.inference_batch_size=0", "trainer.inference_batch_size=0: null or >= 1"),
        ("trainer.offload_reference=true", "trainer.offload_reference=True: with LoRA the"),
    ],
)
def test_each_bad_value_is_refused_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose_train(override))


def test_micro_batch_message_gives_the_batch_rows():
    cfg = compose_train("trainer.batch_size=4", "algorithm.num_responses_per_prompt=4")
    cfg.trainer.micro_batch_size = 6
    with pytest.raises(ConfigError, match=r"num_responses_per_prompt = 16"):
        validate_config(cfg)


def test_missing_data_file_is_refused_naming_data_path(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path='.*': train file not found: .*train.jsonl"):
        validate_config(compose_train("data=gsm8k", f"data.path={tmp_path}"))


def test_struct_mode_rejects_an_unknown_key():
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.lr'"):
        compose_train("trainer.lr=0.1")


def test_cli_refuses_a_bad_value_before_any_model_loads(tmp_path):
    # The Qwen checkpoint is not on this machine: reaching the model load would fail otherwise.
    proc = run_train(
        "model=qwen2_5_0_5b", "algorithm.clip_ratio=1.5", f"hydra.run.dir={tmp_path}", check=False
    )
    assert proc.returncode != 0
    assert "algorithm.clip_ratio=1.5: must be in (0, 1)" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


class ConstantReward(Reward):
    """A reward that gives every completion `value`."""

    def __init__(self, value: float) -> None:
        self.value = value

    def parts(self, completions, answers, completion_lengths):
        return {"constant": [self.value] * len(completions)}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_reward_stops_naming_the_reward_and_the_sample(value):
    reward = ConstantReward(value)
    with pytest.raises(ValueError) as error:
        reward(["the first completion", "another"], ["#### 1", "#### 2"])
    assert str(error.value).startswith(f"ConstantReward gave non-finite reward {value}")
    assert "completion 0: 'the first completion'" in str(error.value)
