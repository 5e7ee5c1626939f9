"""The Python tool: ToRL's text protocol (arXiv 2503.23383), with SimpleTIR's void-turn check.

The model writes a fenced ```python block, then opens an output fence (```output); generation
stops right after that opener (`TURN_STOP`), the environment runs the turn's last python block
in the sandbox (`grpo.tools.sandbox`) and answers with what the model reads (stdout, then the
error's last line; the sandbox cuts it to `max_output_chars`) and the closing fence; the model
goes on. A turn without an output fence is the model's answer: the trajectory ends. Each snippet
runs in a fresh process: nothing carries over from one block to the next (ToRL's executor too).

With `protocol=chat_template` the turn calls the tool in the chat template's own format
(Qwen2.5/Qwen3, Hermes: `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>`,
the tool described by the template from `PYTHON_SCHEMA`); the turn stops after `</tool_call>`
and the result is a tool message, written by the template (grpo.rollout.chat_tools).

SimpleTIR (arXiv 2509.02479) calls a turn with neither a complete code block nor a final answer
a void turn and leaves trajectories holding one out of the loss against multi-turn collapse;
every episode reports `void`, and with `drop_void_turns` also `dropped`, which asks the trainer
to leave the trajectory out of the loss (docs/tools.md, "The protocol").
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from grpo.environments.base import DROPPED, ENVIRONMENTS, TOOL_CALLS, Environment, Episode
from grpo.tasks.answers import extract_answer
from grpo.tasks.base import Row
from grpo.tools.sandbox import Sandbox, SandboxLimits, SandboxResult

# Where a model turn stops: the opening of an output fence, matched as soon as "output" is
# written (ToRL's stop string; the newline after it may come in the same token or not at all).
TURN_STOP = r"```output"
# A python block: its opener line, the code, and the next fence (its closing fence, or an output
# fence opened without closing it).
_BLOCK = re.compile(r"```py(?:thon)?3?[ \t]*\n(.*?)```", re.DOTALL)
# The chat templates' tool call (Qwen2.5/Qwen3, Hermes): JSON between the tags.
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
CLOSE = "\n```\n"  # ends the output block; the model's next turn starts on a new line
NO_CODE = "ToolError: no ```python block before this output block"
NO_OUTPUT = "(no output: print() what you need to see)"
# The tool as a chat template's `tools` list describes it (protocol=chat_template).
PYTHON_SCHEMA = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a sandbox and read what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "print() the result"}},
            "required": ["code"],
        },
    },
}


def last_block(text: str) -> str | None:
    """The code of the last complete python block in `text` (None: none, or only empty ones)."""
    blocks = [code for code in _BLOCK.findall(text) if code.strip()]
    return blocks[-1] if blocks else None


def last_call(text: str) -> str | None:
    """The code of the last complete `<tool_call>` of the python tool in `text` (None: none,
    not JSON, another tool, or no code)."""
    calls = _CALL.findall(text)
    try:
        call = json.loads(calls[-1]) if calls else None
    except json.JSONDecodeError:
        return None
    arguments = call.get("arguments") if isinstance(call, dict) else None
    code = arguments.get("code") if isinstance(arguments, dict) else None
    if call is None or call.get("name") != "python" or not isinstance(code, str):
        return None
    return code if code.strip() else None


@dataclass(frozen=True)
class Protocol:
    """How a turn calls the tool and how its result is written back."""

    turn_stop: str  # a regex: the turn stops once it calls the tool
    code_of: Callable[[str], str | None]  # the code a turn (up to its stop) runs
    no_code: str  # what the model reads after a call without code
    tools: list[dict[str, Any]] | None  # the tool's JSON schema, for the chat template
    observation_role: str | None  # None: the result is appended as text; tool: a tool message


FENCED = Protocol(TURN_STOP, last_block, NO_CODE, None, None)
CHAT_TEMPLATE = Protocol(
    r"</tool_call>",
    last_call,
    'ToolError: call the tool as {"name": "python", "arguments": {"code": "..."}}',
    [PYTHON_SCHEMA],
    "tool",
)
PROTOCOLS = {"fenced": FENCED, "chat_template": CHAT_TEMPLATE}


def is_void(turn: str, protocol: Protocol = FENCED) -> bool:
    """SimpleTIR's void turn: neither a complete tool call (a python block) nor a final
    `#### N` answer."""
    return protocol.code_of(turn) is None and extract_answer(turn, strict=True) is None


class PythonToolEpisode(Episode):
    """One trajectory: runs the python block of each turn that opens an output fence."""

    def __init__(self, tool: PythonTool) -> None:
        self.tool = tool
        self.turns = self.calls = self.errors = self.void_turns = 0

    def step(self, turn: str) -> str | None:
        protocol = self.tool.protocol
        self.turns += 1
        self.void_turns += is_void(turn, protocol)
        call = re.search(protocol.turn_stop, turn)
        if call is None or self.turns >= self.tool.max_turns:
            return None  # the model answered, or it has no turn left to read the output
        code = protocol.code_of(turn[: call.end()])
        if code is None:
            self.errors += 1
            text = protocol.no_code
        else:
            result = self.tool.run(code)
            self.calls += 1
            self.errors += not result.ok
            text = result.text.rstrip("\n") or NO_OUTPUT
        if protocol.observation_role:  # a tool message: the chat template writes it
            return text
        return ("" if turn.endswith("\n") else "\n") + text + CLOSE

    def stats(self) -> dict[str, float]:
        """tool_calls (snippets run; > 0: it used the tool), tool_errors (failed, stopped or no
        code), void_turns, void (any), dropped (1: leave this trajectory out of the loss)."""
        void = float(self.void_turns > 0)
        return {
            TOOL_CALLS: float(self.calls),
            "tool_errors": float(self.errors),
            "void_turns": float(self.void_turns),
            "void": void,
            DROPPED: void if self.tool.drop_void_turns else 0.0,
        }


@ENVIRONMENTS.register("python_tool")
class PythonTool(Environment):
    """ToRL's Python tool over one `Sandbox`, started at the first snippet and shared by every
    episode (it runs one snippet at a time, so concurrent steps wait for each other);
    `close()` stops it. `limits`: `SandboxLimits` fields (the others keep their defaults).
    `protocol`: `fenced` (ToRL's text) or `chat_template` (the template's `<tool_call>` JSON,
    the result as a tool message)."""

    def __init__(
        self,
        *,
        max_turns: int = 4,
        drop_void_turns: bool = False,
        limits: Mapping[str, Any] | None = None,
        protocol: str = "fenced",
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"environment.max_turns must be >= 1, got {max_turns}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"environment.protocol={protocol!r}: one of {', '.join(PROTOCOLS)}")
        self.protocol = PROTOCOLS[protocol]
        self.turn_stop = self.protocol.turn_stop
        self.tools = self.protocol.tools
        self.observation_role = self.protocol.observation_role
        self.max_turns = max_turns
        self.drop_void_turns = drop_void_turns
        self.limits = sandbox_limits(dict(limits or {}))
        self.sandbox: Sandbox | None = None  # started by the first snippet
        self._lock = threading.Lock()

    def reset(self, row: Row) -> PythonToolEpisode:
        return PythonToolEpisode(self)

    def run(self, code: str) -> SandboxResult:
        """The sandbox's result for one snippet (the sandbox starts on the first)."""
        with self._lock:
            if self.sandbox is None:
                self.sandbox = Sandbox(self.limits)
            sandbox = self.sandbox
        return sandbox.run(code)

    def close(self) -> None:
        """Stop the sandbox's server and everything under it (a later snippet starts anew)."""
        with self._lock:
            if self.sandbox is not None:
                self.sandbox.close()
                self.sandbox = None


def sandbox_limits(settings: dict[str, Any]) -> SandboxLimits:
    """`SandboxLimits` from `environment.limits`; ValueError naming the key that is wrong."""
    fields = [f.name for f in dataclasses.fields(SandboxLimits)]
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(
            f"environment.limits.{unknown[0]}: not a sandbox limit (limits: {', '.join(fields)})"
        )
    for name, value in settings.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"environment.limits.{name} must be a positive number, got {value!r}")
    return SandboxLimits(**settings)
