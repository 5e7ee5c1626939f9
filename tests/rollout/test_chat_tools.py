"""Tool results written by a chat template (grpo.rollout.chat_tools, issue 24 item 8): the text
between a tool-calling turn and the next assistant turn, cut from the template's own rendering;
templates that ignore tools or are not prefix-preserving refused in one line; and the multi-turn
driver with `observation_role = "tool"`: the trajectory is the template's conversation, token
ids appended, the model's never re-tokenised. SmolLM2's real tokenizer, with templates written
here in the Hermes/Qwen2.5 tool format (no Qwen tokenizer is available offline)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import compose_config, tiny_policy, tiny_task
from hydra.utils import instantiate
from transformers import AutoTokenizer

from grpo.environments.base import Environment, Episode
from grpo.environments.python_tool import PYTHON_SCHEMA, PythonTool, last_call
from grpo.rollout.backends import BACKENDS
from grpo.rollout.chat_tools import check_tool_template, tool_response_text
from grpo.rollout.multiturn import run_trajectories
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import render_prompts, tokenize_prompts
from grpo.run.build import build_environment
from grpo.run.config import ConfigError, validate_config

# Tools in a system message, each message in ChatML, a tool result as <tool_response> in a user
# turn (the Hermes / Qwen2.5 format).
TOOLS_TEMPLATE = """
{%- if tools %}<|im_start|>system
You may call these functions:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
Call one as <tool_call>{"name": NAME, "arguments": ARGS}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
# The same, but earlier assistant turns lose their reasoning (as Qwen3's template does).
DROPS_REASONING = TOOLS_TEMPLATE.replace(
    "{{ m.content }}<|im_end|>\n{% endif %}",
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endif %}",
)
CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'


@functools.cache
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(instantiate(compose_config().model.checkpoint))


def with_template(template: str):
    tokenizer = copy.deepcopy(smollm2_tokenizer())
    tokenizer.chat_template = template
    return tokenizer


def test_the_tool_message_is_the_templates_text_between_the_turns():
    tokenizer = with_template(TOOLS_TEMPLATE)
    text = tool_response_text(tokenizer, [PYTHON_SCHEMA], CALL, "42")
    response = "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
    assert text == "<|im_end|>\n" + response + "<|im_start|>assistant\n"


def test_a_template_with_tools_that_preserves_prefixes_is_taken():
    check_tool_template(with_template(TOOLS_TEMPLATE), [PYTHON_SCHEMA])


@pytest.mark.parametrize(
    ("template", "why"),
    [(DROPS_REASONING, "not prefix-preserving"), (None, "ignores tools")],
)
def test_other_templates_are_refused_in_one_line(template, why):
    tokenizer = with_template(template) if template else smollm2_tokenizer()  # plain ChatML
    with pytest.raises(ValueError, match=why) as error:
        check_tool_template(tokenizer, [PYTHON_SCHEMA])
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.checkpoint: ")
    assert "environment.protocol=fenced" in message


def test_the_python_tools_chat_protocol_runs_the_last_call():
    tool = PythonTool(protocol="chat_template")
    try:
        episode = tool.reset({})
        assert episode.step("I will compute it.\n" + CALL) == "42"
        assert episode.step("#### 42") is None
        assert episode.stats()["tool_calls"] == 1 and episode.stats()["tool_errors"] == 0
        bad = tool.reset({})
        assert bad.step('<tool_call>\n{"name": "python"}\n</tool_call>').startswith("ToolError")
        assert bad.stats()["tool_errors"] == 1 and bad.stats()["tool_calls"] == 0
    finally:
        tool.close()
    assert (
        last_call('<tool_call>{"name": "shell", "arguments": {"code": "ls"}}</tool_call>') is None
    )
    assert last_call("<tool_call>not json</tool_call>") is None


class ChatEpisode(Episode):
    """Answers its first turn with a tool result, then ends."""

    def __init__(self) -> None:
        self.turns: list[str] = []

    def step(self, turn: str) -> str | None:
        self.turns.append(turn)
        return "42" if len(self.turns) == 1 else None


class ChatEnv(Environment):
    max_turns, turn_stop, observation_role, tools = 2, r"[a-z]", "tool", [PYTHON_SCHEMA]

    def reset(self, row) -> Episode:
        return ChatEpisode()


def test_a_trajectory_is_the_templates_conversation_with_the_sampled_ids_kept():
    policy = tiny_policy()
    policy.tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer, env, task = policy.tokenizer, ChatEnv(), tiny_task()
    prompts = render_prompts(tokenizer, task, task.train[:2], True, env.tools)
    assert all('"name": "python"' in prompt for prompt in prompts)  # the tool described
    ids, mask = tokenize_prompts(tokenizer, prompts, 1024, "cpu")
    settings = SamplingSettings(max_new_tokens=16, max_prompt_length=1024, max_total_tokens=256)
    episodes = [env.reset(row) for row in task.train[:2] for _ in range(2)]
    written = functools.partial(tool_response_text, tokenizer, env.tools)
    torch.manual_seed(0)
    engine = BACKENDS["lean"](policy, settings)
    rollout, _ = run_trajectories(
        engine, tokenizer, ids, mask, 2, settings, episodes, 2, env.turn_stop, written
    )
    for row, episode in enumerate(episodes):
        if len(episode.turns) < 2:
            continue  # the first turn was cut at its budget: no tool message
        first, second = episode.turns
        between = tool_response_text(tokenizer, env.tools, first, "42")
        ids_row = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        env_ids = [
            i for i, m in zip(ids_row, rollout.loss_mask[row].tolist(), strict=False) if not m
        ]
        assert env_ids == tokenizer(between, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids_row) == first + between + second
    assert sum(len(e.turns) == 2 for e in episodes) >= 2


def test_the_chat_protocol_is_refused_without_a_chat_model_or_by_another_name():
    tool = ("environment=python_tool", "environment.protocol=chat_template")
    with pytest.raises(ConfigError, match="environment.protocol='chat_template': the template"):
        validate_config(compose_config("model=tiny", *tool))
    with pytest.raises(ConfigError, match="environment.protocol='xml': one of fenced, chat_"):
        build_environment(compose_config("environment=python_tool", "environment.protocol=xml"))
