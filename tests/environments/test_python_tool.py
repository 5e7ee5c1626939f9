"""The Python tool (grpo/environments/python_tool.py, issue 24 item 4): ToRL's protocol over the
real sandbox: what the model reads after each kind of turn, when the trajectory ends, the
void-turn rule, the stats, the stop regex on real tokenizers' token splits, and that closing the
environment leaves no process."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.utils import instantiate
from transformers import AutoTokenizer

from grpo.environments.base import ENVIRONMENTS
from grpo.environments.python_tool import (
    CLOSE,
    NO_CODE,
    NO_OUTPUT,
    TURN_STOP,
    PythonTool,
    is_void,
    last_block,
)

LIMITS = {"wall_seconds": 4.0, "cpu_seconds": 2, "memory_mb": 256, "max_output_chars": 200}
CALL = "Let me compute it.\n```python\nprint(3 * 4)\n```\n```output"


@pytest.fixture(scope="module")
def tool():
    environment = PythonTool(max_turns=4, limits=LIMITS)
    yield environment
    environment.close()


def test_the_registry_builds_it_from_its_yaml_settings():
    cfg = compose_config("environment=python_tool")
    settings = {k: v for k, v in cfg.environment.items() if k != "name"}
    ENVIRONMENTS.check(cfg.environment.name, settings, "environment.name")
    environment = ENVIRONMENTS[cfg.environment.name](**settings)
    assert isinstance(environment, PythonTool) and environment.sandbox is None  # not started
    assert environment.max_turns == cfg.environment.max_turns
    assert environment.limits.max_output_chars == cfg.environment.limits.max_output_chars


def test_a_turn_with_code_reads_its_output_and_the_closing_fence(tool):
    episode = tool.reset({"question": "?", "answer": "#### 12"})
    assert episode.step(CALL) == "\n12" + CLOSE
    assert episode.step(CALL + "\n") == "12" + CLOSE  # the opener's newline already written
    stats = episode.stats()
    assert stats["tool_calls"] == 2 and stats["tool_errors"] == 0


def test_the_trajectory_reads_as_a_closed_output_block(tool):
    episode = tool.reset({})
    trajectory = CALL + episode.step(CALL) + "#### 12\n"
    assert trajectory.endswith("```output\n12\n```\n#### 12\n")
    assert episode.step("#### 12\n") is None


def test_an_error_reads_as_the_stdout_then_the_errors_last_line(tool):
    episode = tool.reset({})
    turn = "```python\nprint('before')\n1 / 0\n```\n```output"
    assert episode.step(turn) == "\nbefore\nZeroDivisionError: division by zero" + CLOSE
    assert episode.stats()["tool_errors"] == 1 and episode.stats()["tool_calls"] == 1


def test_a_snippet_past_its_wall_time_is_a_tool_error(tool):
    episode = tool.reset({})
    observation = episode.step("```python\nimport time\ntime.sleep(60)\n```\n```output")
    assert "TimeoutError" in observation and observation.endswith(CLOSE)
    assert episode.stats()["tool_errors"] == 1


def test_long_output_is_cut_to_max_output_chars(tool):
    episode = tool.reset({})
    observation = episode.step("```python\nprint('x' * 5000)\n```\n```output")
    body = observation.removeprefix("\n").removesuffix(CLOSE)
    assert len(body) <= LIMITS["max_output_chars"] and "[... output cut]" in body
    assert body.startswith("x" * 100)


def test_a_snippet_that_prints_nothing_is_told_so(tool):
    episode = tool.reset({})
    assert episode.step("```python\nx = 3 * 4\n```\n```output") == "\n" + NO_OUTPUT + CLOSE
    assert episode.stats()["tool_errors"] == 0


def test_a_turn_with_two_blocks_runs_the_last(tool):
    turn = "```python\nprint(1)\n```\nNo, rather:\n```python\nprint(2)\n```\n```output"
    assert tool.reset({}).step(turn) == "\n2" + CLOSE


def test_each_snippet_starts_afresh(tool):
    episode = tool.reset({})
    episode.step("```python\nx = 5\nprint(x)\n```\n```output")
    assert "NameError" in episode.step("```python\nprint(x)\n```\n```output")


def test_a_block_left_open_before_the_output_fence_still_runs(tool):
    assert tool.reset({}).step("```python\nprint(7)\n```output") == "\n7" + CLOSE


def test_an_output_fence_without_code_is_a_tool_error_and_a_void_turn(tool):
    episode = tool.reset({})
    assert episode.step("The answer is below.\n```output") == "\n" + NO_CODE + CLOSE
    stats = episode.stats()
    assert stats["tool_errors"] == 1 and stats["tool_calls"] == 0
    assert stats["void_turns"] == 1 and stats["void"] == 1


def test_a_turn_without_an_output_fence_ends_the_trajectory(tool):
    episode = tool.reset({})
    assert episode.step("3 * 4 = 12\n#### 12\n") is None
    assert episode.stats() == {
        "tool_calls": 0.0,
        "tool_errors": 0.0,
        "void_turns": 0.0,
        "void": 0.0,
        "dropped": 0.0,
    }


def test_the_last_allowed_turn_runs_no_code():
    environment = PythonTool(max_turns=2, limits=LIMITS)
    episode = environment.reset({})
    assert episode.step(CALL) is not None
    assert episode.step(CALL) is None  # turn 2 of 2: nobody would read the output
    assert episode.stats()["tool_calls"] == 1
    environment.close()


@pytest.mark.parametrize(
    ("turn", "void"),
    [
        (CALL, False),  # a complete block, run
        ("```python\nprint(3 * 4)\n```\nThat prints 12.", False),  # a complete block, not run
        ("3 * 4 = 12\n#### 12\n", False),  # the final answer
        ("I think the answer is twelve.", True),  # neither: SimpleTIR's void turn
        ("```output", True),  # an output fence without code
        ("```python\n\n```\n```output", True),  # an empty block
        ("```python\nprint(3 *", True),  # a block cut off (by the token budget)
        ("The answer is 12.", True),  # an answer, but not the `#### N` one
    ],
)
def test_a_void_turn_has_neither_a_complete_block_nor_a_final_answer(turn, void):
    assert is_void(turn) is void


def test_last_block_finds_the_code_of_the_last_complete_block():
    assert last_block("```python\na = 1\n```\n```py\nb = 2\n```") == "b = 2\n"
    assert last_block("```python3\nc = 3\n```") == "c = 3\n"
    assert last_block("```python\na = 1\n```\n```python\nb = 2") == "a = 1\n"
    assert last_block("no code") is None


def test_a_void_turn_drops_the_trajectory_only_when_asked():
    turns = [CALL, "I am done."]
    for drop in (False, True):
        environment = PythonTool(max_turns=4, drop_void_turns=drop, limits=LIMITS)
        episode = environment.reset({})
        assert episode.step(turns[0]) is not None and episode.step(turns[1]) is None
        stats = episode.stats()
        assert stats["void_turns"] == 1 and stats["void"] == 1 and stats["tool_calls"] == 1
        assert stats["dropped"] == float(drop)
        environment.close()


def test_episodes_stepped_from_several_threads_share_one_sandbox(tool):
    results: dict[int, str] = {}

    def work(i: int) -> None:
        episode = tool.reset({})
        results[i] = episode.step(f"```python\nprint({i} * 10)\n```\n```output")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: f"\n{i * 10}" + CLOSE for i in range(4)}


def test_closing_stops_the_sandbox_and_a_later_snippet_starts_a_new_one():
    environment = PythonTool(limits=LIMITS)
    environment.reset({}).step(CALL)
    pid = environment.sandbox.server_pid
    assert Path(f"/proc/{pid}").exists()
    environment.close()
    assert environment.sandbox is None and not Path(f"/proc/{pid}").exists()
    assert environment.reset({}).step(CALL) == "\n12" + CLOSE
    environment.close()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_turns": 0}, "environment.max_turns must be >= 1, got 0"),
        ({"limits": {"wall_seconds": 0}}, "environment.limits.wall_seconds must be a positive"),
        ({"limits": {"memory_mb": -1}}, "environment.limits.memory_mb must be a positive"),
        ({"limits": {"wall": 3}}, "environment.limits.wall: not a sandbox limit"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_key(setting, message):
    with pytest.raises(ValueError, match=message):
        PythonTool(**setting)


# Text before the output fence that must not stop the turn: the python fence, a closing fence,
# "output" in prose and in code.
BEFORE = "The output: let me see.\n```python\noutput = 3 * 4\nprint(output)\n```\n"


def first_stop(prefixes: list[str]) -> str | None:
    """The first prefix the stop regex matches (a turn stops there), as the backends check it."""
    return next((p for p in prefixes if re.search(TURN_STOP, p)), None)


def test_the_stop_matches_right_after_the_fence_opener_whatever_the_split():
    text = BEFORE + "```output\n12\n```\n"
    stop = first_stop([text[:end] for end in range(1, len(text) + 1)])  # every split point
    assert stop == BEFORE + "```output"


@pytest.mark.parametrize("model", ["smollm2_135m", "tiny"])
def test_the_stop_matches_at_the_fence_opener_in_a_real_tokenizers_tokens(model):
    folder = instantiate(compose_config(f"model={model}").model.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for fence in ("```output\n12\n```\n", "```output\n\n12\n```\n", "```output 12\n```\n"):
        ids = tokenizer.encode(BEFORE + fence, add_special_tokens=False)
        prefixes = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids))]
        stop = first_stop(prefixes)
        assert stop is not None and stop.startswith(BEFORE + "```output"), (model, fence, stop)
        assert len(stop) <= len(BEFORE + "```output") + 2  # at most the newline(s) after it
