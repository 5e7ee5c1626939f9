"""Named registries for the pieces researchers swap (verl's `register_adv_est` style).

A registry maps a name to a function. Adding an entry is one decorated function; a YAML then
picks it by name, and `grpo.run.config` checks the name (and the settings the YAML passes
to it) against the registry before anything loads. Tests enumerate the registries, so a new
entry is covered by the generic tests without editing them. `import_function` finds a function
that a config names by its dotted path instead (your own reward function or answer checker).
"""

from __future__ import annotations

import importlib
import inspect
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Interval:
    """A setting's allowed range, attached as `Annotated[float, Interval(...)]`; None = open."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False

    def __str__(self) -> str:
        left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


class Registry(Mapping[str, Callable[..., Any]]):
    """Name -> function, filled by the `register(name)` decorator.

    `settings(name)` are the keyword-only parameters of the entry (what a YAML may set);
    `check(name, settings, key)` raises ValueError naming `key` for an unknown name or setting.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under `name` (each name once)."""

        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self)}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def settings(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword-only parameters of entry `name`: the settings a config may give it."""
        params = inspect.signature(self[name]).parameters.values()
        return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def check(self, name: str, settings: Mapping[str, Any], key: str) -> None:
        """ValueError naming the config key when `name` (the value of `key`, e.g.
        `algorithm.policy_loss.name`) is not registered, a setting (a sibling key) is not its
        own, or a value is outside the `Interval` its annotation gives."""
        prefix = key.rpartition(".")[0]
        if name not in self._entries:
            raise ValueError(f"{key}={name!r}: unknown {self.kind}; registered: {', '.join(self)}")
        own = self.settings(name)
        for setting in settings:
            if setting not in own:
                raise ValueError(
                    f"{prefix}.{setting}: not a setting of {self.kind} {name!r} (its "
                    f"settings: {', '.join(own) or 'none'})"
                )
        missing = [n for n, p in own.items() if p.default is inspect.Parameter.empty]
        missing = [n for n in missing if n not in settings]
        if missing:
            raise ValueError(f"{prefix}: {self.kind} {name!r} needs {', '.join(missing)}")
        hints = typing.get_type_hints(self[name], include_extras=True)
        for setting, value in settings.items():
            for bound in getattr(hints.get(setting), "__metadata__", ()):
                if isinstance(bound, Interval) and value is not None and not bound.holds(value):
                    raise ValueError(f"{prefix}.{setting}={value!r}: must be in {bound}")


def import_function(path: str, key: str) -> Callable[..., Any]:
    """The function at the dotted `path` (`package.module.function`), imported; ValueError
    naming the config `key` when there is no such module or name, or it is not callable."""
    module, _, name = str(path).rpartition(".")
    if not module or not name:
        raise ValueError(f"{key}={path!r}: not a dotted path module.function")
    try:
        found = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ValueError(f"{key}={path!r}: cannot import {module!r} ({error})") from None
    except AttributeError:
        raise ValueError(f"{key}={path!r}: module {module!r} has no {name!r}") from None
    if not callable(found):
        raise ValueError(f"{key}={path!r}: not callable")
    return found
