"""The tool tasks (conf/task/arithmetic_tool.yaml, gsm8k_tool.yaml; issue 24 item 6): the GSM8K-
format tasks with the tool prompt, the `python_tool` environment and the `strict` reward, and
that reward read on trajectories holding code and tool output (the output comes from the real
environment)."""

from __future__ import annotations

import pytest
from conftest import compose_config
from hydra.utils import instantiate

from grpo.environments.python_tool import PythonTool
from grpo.run.config import validate_config

ANSWER = "Sam has 3 * 4 = <<3*4=12>>12 pens.\n#### 12"


@pytest.fixture(scope="module")
def tool():
    environment = PythonTool(limits={"wall_seconds": 4.0, "max_output_chars": 200})
    yield environment
    environment.close()


def trajectory(tool: PythonTool, code: str, after: str) -> str:
    """A model turn running `code`, the tool's output as the environment answers, then `after`."""
    turn = f"```python\n{code}\n```\n```output"
    return turn + tool.reset({}).step(turn) + after


@pytest.mark.parametrize("option", ["arithmetic_tool", "gsm8k_tool"])
def test_a_tool_task_picks_the_python_tool_the_strict_reward_and_the_tool_prompt(option):
    cfg = compose_config(f"task={option}")
    base = compose_config(f"task={option.removesuffix('_tool')}")
    assert cfg.environment.name == "python_tool" and base.environment.name == "single_turn"
    assert cfg.reward.components.correctness.strict
    assert not base.reward.components.correctness.strict
    assert cfg.task._target_ == base.task._target_  # the same task class, another prompt
    for word in ("{question}", "```python", "```output", "#### [number]", "#### 12"):
        assert word in cfg.task.template


def test_an_explicit_environment_or_reward_wins_over_the_tasks():
    cfg = compose_config("task=arithmetic_tool", "environment=single_turn", "reward=quickstart")
    assert cfg.environment.name == "single_turn"
    assert not cfg.reward.components.correctness.strict


def test_arithmetic_tool_asks_the_question_with_the_protocol_and_its_example():
    cfg = compose_config("task=arithmetic_tool", "task.num_train=4", "task.num_test=2")
    validate_config(cfg)
    task, plain = instantiate(cfg.task), instantiate(compose_config("task=arithmetic").task)
    row = task.test[0]
    assert row == plain.test[0]  # the same problems
    prompt = task.prompt(row)
    assert prompt.endswith(f"#### 12\n\nQuestion: {row['question']}")
    assert prompt != plain.prompt(row)


def test_gsm8k_tool_builds_from_local_files(gsm8k_dir):
    cfg = compose_config("task=gsm8k_tool", f"task.path={gsm8k_dir}", "task.max_test_samples=2")
    task = instantiate(cfg.task)
    assert "```output" in task.prompt(task.test[0]) and len(task.test) == 2


@pytest.mark.parametrize(
    ("code", "after", "pays"),
    [
        ("print(3 * 4)", "#### 12\n", 1.1),  # right, ends at its single `#### N` line
        ("print(3 * 4)", "#### 13\n", 0.1),  # the model's answer, not the tool's 12
        ("print(3 * 4)", "So Sam has 12 pens.", 0.0),  # no `#### N`: nothing pays
        ("print('####', 3 * 4)", "#### 12\n", 1.0),  # right; the tool's `####` too: no bonus
        ("print('#### 12')", "", 1.0),  # a trajectory without an answer of the model's own
    ],
)
def test_the_strict_reward_reads_the_last_answer_line_of_a_tool_trajectory(tool, code, after, pays):
    reward = instantiate(compose_config("task=arithmetic_tool").reward)
    text = trajectory(tool, code, after)
    assert reward([text], [ANSWER]).total == pytest.approx([pays])


def test_the_lenient_reward_would_pay_the_tools_last_number(tool):
    """Why the tool tasks use the strict reward: quickstart's falls back to the last number."""
    text = trajectory(tool, "print(3 * 4)", "So Sam has twelve pens.")  # the last number: 12
    lenient = instantiate(compose_config("task=arithmetic_tool", "reward=quickstart").reward)
    assert lenient([text], [ANSWER]).total == pytest.approx([1.0])


def test_the_held_out_check_reads_the_models_answer_after_tool_output(tool):
    task = instantiate(compose_config("task=arithmetic_tool", "task.num_train=4").task)
    row = {"question": "?", "answer": ANSWER}
    right, wrong = (trajectory(tool, "print(3 * 4)", f"#### {n}\n") for n in (12, 13))
    assert task.check(right, row)["accuracy_strict"] == 1.0 and task.correct(right, row)
    assert task.check(wrong, row)["accuracy_strict"] == 0.0 and not task.correct(wrong, row)
