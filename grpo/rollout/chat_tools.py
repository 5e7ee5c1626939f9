"""Tool results in a chat template's own format (Qwen2.5/Qwen3, Hermes: `<tool_call>` JSON in
the assistant turn, the result as a `tool` message that the template renders, for Qwen inside
`<tool_response>` in a user turn).

An environment with `observation_role = "tool"` answers a model turn with a tool message's
content; `tool_response_text` is the text the template puts between the end of that assistant
turn and the start of the next one: the turn's end, the tool message, the next assistant header.
It is rendered on a probe conversation and cut at the turn, which is exact only for a
prefix-preserving template (appending a message never changes the text before it): the check
`check_tool_template` runs once, before training, and refuses another template (or one that
ignores tools, as SmolLM2's plain ChatML does) in one line.
The ids of that text are appended like any observation (grpo.rollout.multiturn), so the model's
sampled ids are never re-tokenised.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

_PROBE = [{"role": "user", "content": "What is 6 * 7?"}]
# Turns that templates are known to rewrite when later messages follow (Qwen3 drops the
# reasoning of earlier assistant turns): the check's probe holds one.
_PROBE_TURNS = (
    '<think>\nmultiply\n</think>\n<tool_call>\n{"name": "python", "arguments": {"code": '
    '"print(6 * 7)"}}\n</tool_call>',
    "#### 42",
)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    tools: list[dict[str, Any]] | None,
    generation_prompt: bool,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )


def tool_response_text(
    tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None, turn: str, content: str
) -> str:
    """The template's text after the assistant turn `turn` whose tool call returned `content`,
    up to the next assistant turn's first token (see the module docstring)."""
    head = _render(tokenizer, _PROBE, tools, True) + turn
    answer = [{"role": "assistant", "content": turn}, {"role": "tool", "content": content}]
    full = _render(tokenizer, [*_PROBE, *answer], tools, True)
    if not full.startswith(head):
        raise ValueError(_NOT_PREFIX)
    return full[len(head) :]


def check_tool_template(
    tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None
) -> None:
    """ValueError (one line naming the key) unless the chat template describes `tools` in the
    prompt and is prefix-preserving: every message appended to a probe conversation of two
    tool rounds leaves the text before it as it was."""
    if _render(tokenizer, _PROBE, tools, True) == _render(tokenizer, _PROBE, None, True):
        raise ValueError(_NO_TOOLS)
    messages = list(_PROBE)
    before = _render(tokenizer, messages, tools, True)
    for turn in _PROBE_TURNS:
        messages.append({"role": "assistant", "content": turn})
        if not _render(tokenizer, messages, tools, False).startswith(before + turn):
            raise ValueError(_NOT_PREFIX)
        messages.append({"role": "tool", "content": "42"})
        after = _render(tokenizer, messages, tools, True)
        if not after.startswith(_render(tokenizer, messages[:-1], tools, False)):
            raise ValueError(_NOT_PREFIX)
        before = after


_NO_TOOLS = (
    "model.checkpoint: its chat template ignores tools (the prompt is the same with and without "
    "them), so the model is never told how to call one: use environment.protocol=fenced"
)
_NOT_PREFIX = (
    "model.checkpoint: its chat template is not prefix-preserving (appending a message changes "
    "the text before it), so tool results cannot be appended to the sampled tokens: use "
    "environment.protocol=fenced"
)
