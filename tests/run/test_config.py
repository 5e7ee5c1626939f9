"""The config: every option of every group composes and passes the checks, the schema types every
key, each bad value stops before any model loads with one line naming the key (exit code 2 from
the CLI), and each setting has one name."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import typing

import pytest
import torch
from conftest import CONF_DIR, TINY, compose_config, run_train
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from grpo.algorithm.advantages import ADVANTAGE_ESTIMATORS
from grpo.algorithm.kl import KL_ESTIMATORS
from grpo.algorithm.loss import AGGREGATIONS, GRPOLoss
from grpo.algorithm.policy_losses import POLICY_LOSSES
from grpo.algorithm.rollout_correction import ROLLOUT_CORRECTIONS
from grpo.rollout.backends import BACKENDS
from grpo.rollout.sampler import GroupedSampler
from grpo.run.build import build_loss
from grpo.run.config import (
    RANGES,
    ConfigError,
    micro_batch_size,
    one_line,
    validate_config,
)
from grpo.run.schema import TrainSchema
from grpo.tasks.base import Task
from grpo.tasks.rewards import Reward
from grpo.train import train

# A checkpoint that does not exist: a run that got as far as loading the model would fail there.
NO_MODEL = ("model=tiny", "model.checkpoint=/no/such/model")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Every config group under conf/, read from the folders; those tested elsewhere or that are not
# options of the train config are left out, each with its reason.
NOT_COMPOSED_HERE = {
    "task": "needs its data: test_every_task_builds_...",
    "model/_shared": "defaults the model options include, not an option",
    "task/_tool": "what the tool tasks include (prompt, environment, reward), not an option",
    "hydra": "Hydra's own settings (run folders, launchers): tests/run/test_sweeps.py",
    "hydra/launcher": "launchers need their plugins and a sweep: tests/run/test_sweeps.py",
}
GROUPS = sorted(
    str(folder.relative_to(CONF_DIR))
    for folder in CONF_DIR.rglob("*")
    if folder.is_dir()
    and any(folder.glob("*.yaml"))
    and str(folder.relative_to(CONF_DIR)) not in NOT_COMPOSED_HERE
)


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in GROUPS for option in options(group)]
)
def test_every_option_composes_and_passes_the_checks(override):
    cfg = compose_config(override)
    validate_config(cfg)
    loss = build_loss(cfg)
    assert isinstance(loss, GRPOLoss)
    assert isinstance(instantiate(cfg.reward), Reward)
    sampler = instantiate(cfg.algorithm.sampler, num_prompts=10, batch_size=2, group_size=2)
    assert isinstance(sampler, GroupedSampler)


def local_task(option: str, request, tmp_path) -> list[str]:
    """Overrides that point a task at local files (no hub here), by the hub data set its YAML
    names: GSM8K's copy, or rows the test writes (math problems for MATH-500, questions with
    one-word answers for a task with no data set of its own, task=dataset)."""
    task = compose_config(f"task={option}").task  # with what its defaults list includes
    if "path" not in task:  # generated problems
        return []
    if task.hub_id == "openai/gsm8k":
        return [f"task.path={request.getfixturevalue('gsm8k_dir')}"]
    if task.hub_id == "HuggingFaceH4/MATH-500":
        rows = [{"problem": "What is $1 + 1$?", "answer": "2"}] * 2
    else:
        rows = [{"question": "What is the capital of France?", "answer": "Paris"}] * 2
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows))
    return [f"task.path={tmp_path}"]


@pytest.mark.parametrize("option", options("task"))
def test_every_task_builds_and_its_default_reward_pays_the_right_answer(option, request, tmp_path):
    cfg = compose_config(f"task={option}", *local_task(option, request, tmp_path))
    validate_config(cfg)
    task = instantiate(cfg.task)
    assert isinstance(task, Task) and task.train and task.test
    reward = instantiate(cfg.reward)
    row = task.test[0]
    right = task.reference_completion(row)
    answer = task.answer(row)
    assert reward([right], [answer]).total[0] > reward(["?"], [answer]).total[0]
    assert task.correct(right, row) and task.check(right, row)["accuracy_strict"] == 1.0


def test_the_default_config_is_the_quickstart_recipe():
    assert OmegaConf.to_container(compose_config()) == OmegaConf.to_container(
        compose_config("experiment=quickstart")
    )
    cfg = compose_config()
    assert cfg.model.checkpoint._target_ == "grpo.model.loading.smollm2_checkpoint"
    assert cfg.model.lora.enabled and cfg.model.lora.r == 16 and cfg.model.lora.alpha == 32
    assert cfg.task._target_ == "grpo.tasks.arithmetic.Arithmetic"


def interpolations(node, path: str = "") -> list[tuple[str, str]]:
    """(key, value) of every string holding `${...}` in an unresolved config."""
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in interpolations(v, f"{path}{k}.")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in interpolations(v, f"{path}{i}.")]
    return [(path[:-1], node)] if isinstance(node, str) and "${" in node else []


@pytest.mark.parametrize("override", [f"experiment={x}" for x in options("experiment")] + [""])
def test_each_setting_has_one_name(override):
    """No key copies another by interpolation (they could be set apart by an override); only
    paths are referred to, and the environment read."""
    cfg = compose_config(*([override] if override else []))
    found = interpolations(OmegaConf.to_container(cfg, resolve=False))
    for key, value in found:
        assert re.fullmatch(r"\$\{(paths\.\w+|oc\.env:[^}]+)\}", value), (key, value)


def test_a_paper_pairing_of_algorithm_and_reward_is_an_experiment():
    """`-m algorithm=a,b` compares algorithms on one reward; experiment= adds a paper's reward."""
    rewards = {compose_config(f"algorithm={a}").reward._target_ for a in options("algorithm")}
    assert rewards == {"grpo.tasks.rewards.CombinedReward"}
    assert list(compose_config("experiment=dapo").reward.components) == ["correctness", "overlong"]
    assert compose_config("experiment=bnpo").algorithm.advantage.name == "bnpo"


def test_dapo_with_a_kl_term_is_one_setting_the_loss_and_the_reference_share():
    cfg = compose_config("algorithm=dapo", "algorithm.kl.coef=0.04")
    validate_config(cfg)
    loss = build_loss(cfg)
    assert (
        loss.kl_coef == 0.04 and cfg.algorithm.kl.coef == 0.04
    )  # train builds the reference from it


@pytest.mark.parametrize("world", [1, 2, 4])
def test_defaults_run_on_any_number_of_processes_sharing_the_batch(world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = compose_config()
    validate_config(cfg)
    assert micro_batch_size(cfg) == 4 * 4 // world  # a process's rows, at once


def choice_keys() -> dict[str, list[str]]:
    """Every enumerated key of the schema, with its choices."""
    found: dict[str, list[str]] = {}

    def walk(schema, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            elif isinstance(kind, type) and issubclass(kind, enum.Enum):
                found[prefix + f.name] = [m.value for m in kind]

    walk(TrainSchema, "")
    return found


REGISTRY_KEYS = {
    "algorithm.rollout_correction.name": ROLLOUT_CORRECTIONS,
    "algorithm.policy_loss.name": POLICY_LOSSES,
    "algorithm.advantage.name": ADVANTAGE_ESTIMATORS,
    "algorithm.kl.estimator": KL_ESTIMATORS,
    "algorithm.loss.aggregation": AGGREGATIONS,
    "rollout.backend": BACKENDS,
}


def config_error(*overrides: str, tmp_path=None) -> str:
    """The one-line message of a config error, from composing and from `train` (which must
    refuse before it reaches the model, whose checkpoint does not exist)."""
    try:
        cfg = compose_config(*TINY, *NO_MODEL, *overrides)
    except ConfigCompositionException as error:
        return one_line(error)
    with pytest.raises(ConfigError) as error:
        train(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    line = one_line(error.value)
    assert "\n" not in line
    return line


def test_the_schema_enumerates_choice_keys():
    assert choice_keys() == {
        "algorithm.old_logprobs": ["trainer", "engine"],
        "model.dtype": ["float32", "bfloat16", "float16"],
        "model.tokenizer.padding_side": ["left", "right"],
        "rollout.vllm.lora_sync": ["adapter", "merged"],
        "rollout.vllm.mode": ["colocate", "server"],
        "rollout.vllm.weight_transfer": ["auto", "files", "nccl", "ipc"],
        "trainer.device": ["auto", "cpu", "cuda"],
        "trainer.strategy": ["ddp", "fsdp"],
    }


@pytest.mark.parametrize("key", sorted(choice_keys()))
def test_every_choice_key_refuses_a_wrong_value_naming_it(key, tmp_path):
    line = config_error(f"{key}=nonsense", tmp_path=tmp_path)
    assert key in line and "nonsense" in line
    for choice in choice_keys()[key]:
        assert choice in line  # the valid choices are listed


@pytest.mark.parametrize("key", sorted(REGISTRY_KEYS))
def test_every_registry_key_refuses_a_wrong_name_listing_the_registered(key, tmp_path):
    line = config_error(f"{key}=nonsense", tmp_path=tmp_path)
    assert line.startswith(f"{key}='nonsense': unknown")
    assert ", ".join(REGISTRY_KEYS[key]) in line


@pytest.mark.parametrize("group", [*GROUPS, "task"])
def test_every_group_refuses_a_missing_option_listing_its_options(group, tmp_path):
    line = config_error(f"{group}=nonsense", tmp_path=tmp_path)
    assert f"'{group}/nonsense'" in line and all(o in line for o in options(group))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.update_epochs=0"], "algorithm.update_epochs=0: must be >= 1"),
        (["algorithm.num_mini_batches=3"], "algorithm.num_mini_batches=3: must divide the 4"),
        (
            [
                "algorithm.dynamic_sampling.enabled=true",
                "algorithm.dynamic_sampling.max_extra_rounds=-1",
            ],
            "algorithm.dynamic_sampling.max_extra_rounds=-1: must be >= 0",
        ),
        (
            ["algorithm/advantage=no_std", "+algorithm.advantage.eps=0.1"],
            "algorithm.advantage.eps: not a setting of advantage estimator 'no_std'",
        ),
        (
            ["algorithm/advantage=gdpo", "algorithm.kl.in_reward=true"],
            "algorithm.kl.in_reward=True: gdpo normalises each part of the reward",
        ),
        (
            ["algorithm.policy_loss.clip_ratio=1.5"],
            r"algorithm.policy_loss.clip_ratio=1.5: must be in (0, 1)",
        ),
        (
            ["model.lora.enabled=false", "model.load_in_4bit=true"],
            "model.load_in_4bit=True: 4-bit base weights train only LoRA",
        ),
        (
            ["model.lora.enabled=true", "trainer.offload_reference=true"],
            "trainer.offload_reference=True: with LoRA",
        ),
        (
            ["model.lora.enabled=true", "algorithm.reference_update.every=5"],
            "algorithm.reference_update.every=5: reference updates need full",
        ),
        (
            ["algorithm/rollout_correction=token_mask", "algorithm.rollout_correction.low=3"],
            "algorithm.rollout_correction.low=3: must be <= algorithm.rollout_correction.high = 2",
        ),
        (
            ["eval.comparison.prompts=[{question: q}]"],
            "eval.comparison.prompts[0]={'question': 'q'}: each fixed problem needs",
        ),
        (
            ["trainer.micro_batch_size=3"],
            "trainer.micro_batch_size=3: must divide trainer.batch_size",
        ),
        (
            ["rollout.min_new_tokens=9"],
            "rollout.min_new_tokens=9: must be <= rollout.max_new_tokens = 8",
        ),
        (
            ["eval.heldout.num_samples=2", "eval.heldout.k=5"],
            "eval.heldout.k=5: pass@k and maj@k need 1 <= k <= eval.heldout.num_samples = 2",
        ),
        (["trainer.resume=/no/such/run"], "trainer.resume='/no/such/run': null, auto, or an"),
        (
            ["rollout.max_staleness=1"],  # the lean backend: it cannot generate ahead
            "rollout.max_staleness=1: generation ahead of training needs vLLM servers",
        ),
        (
            ["algorithm.old_logprobs=engine", "algorithm/rollout_correction=token_mask"],
            "algorithm.rollout_correction.name='token_mask': algorithm.old_logprobs=engine makes",
        ),
        (
            ["trainer.batch_size=foo"],
            "trainer.batch_size: Value 'foo' of type 'str' could not be converted to Integer",
        ),
        (
            ["trainer.no_such_key=1"],
            "trainer.no_such_key: Key 'no_such_key' not in 'TrainerSchema'",
        ),
    ],
)
def test_each_bad_value_stops_before_the_model_naming_its_key(overrides, message, tmp_path):
    assert message in config_error(*overrides, tmp_path=tmp_path)


@pytest.mark.parametrize(("key", "rule", "test"), RANGES, ids=[r[0] for r in RANGES])
def test_every_range_rule_refuses_a_value_outside_it(key, rule, test, tmp_path):
    bad = next(v for v in (-1, 0, 1.5, 2, -0.5) if not test(v))
    line = config_error(f"{key}={bad}", tmp_path=tmp_path)
    assert line.startswith(f"{key}=") and rule in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("rollout.backend=vlm",), "rollout.backend='vlm': unknown generation backend; registered"),
        (("algorithm.update_epochs=0",), "algorithm.update_epochs=0: must be >= 1"),
        (("task=gsm8k", "task.path=/no/such/folder"), "task.path='/no/such/folder': train file"),
    ],
)
def test_the_cli_prints_one_line_and_exits_with_code_2(overrides, message, tmp_path):
    proc = run_train(*NO_MODEL, *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_failure_that_is_not_a_config_error_keeps_its_traceback():
    assert one_line(RuntimeError("a bug")) is None
    assert one_line(ZeroDivisionError()) is None
    assert torch.__version__  # the CLI re-raises those (grpo.train.cli)


def test_generation_ahead_under_torchrun_is_refused_naming_the_key(monkeypatch):
    """rollout.max_staleness >= 1 with several trainer processes, refused before the vLLM
    checks (which need vLLM installed)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    server = ("rollout.backend=vllm", "rollout.vllm.mode=server", "rollout.max_staleness=2")
    cfg = compose_config(*TINY, *NO_MODEL, *server)
    with pytest.raises(ConfigError, match="rollout.max_staleness=2: generation ahead of training"):
        validate_config(cfg)
