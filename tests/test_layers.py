"""Imports point down: every `grpo` import against the README's layer order fails here, and so
does a module the README's layout does not list. The order is read from the README, so the page
and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "grpo"
# Third-party packages the math and the tasks must not import (they take tensors and text).
PLAIN = {"grpo.algorithm": ("transformers", "hydra", "omegaconf", "wandb", "peft")}
PLAIN["grpo.tasks"] = PLAIN["grpo.algorithm"]


def layers() -> list[list[str]]:
    """The README's `Layers, lowest first: a, b < c < ...` as groups of module names."""
    text = " ".join(REPO.joinpath("README.md").read_text().split())
    order = re.search(r"Layers, lowest first: ([^.]+)\.", text).group(1)
    return [[f"grpo.{name.strip()}" for name in group.split(",")] for group in order.split("<")]


def layer_of(module: str, order: list[list[str]]) -> int | None:
    """The index of the layer holding `module` (a package holds its submodules)."""
    for index, group in enumerate(order):
        if any(module == name or module.startswith(name + ".") for name in group):
            return index
    return None


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `tree`, relative ones resolved against `module`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            if base == "grpo":  # `from grpo import distributed`: the submodules themselves
                found += [(node.lineno, f"grpo.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def violations(root: Path, order: list[list[str]]) -> list[str]:
    """Every import in the package at `root` that points up the order or out of `PLAIN`'s
    bounds, and every module no layer holds, as 'file:line: reason'."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if module == "grpo":
            continue
        here = layer_of(module, order)
        if here is None:
            problems.append(f"{path.name}: {module} is in no layer of the README's order")
            continue
        for line, target in imported(ast.parse(path.read_text()), module):
            where = f"{path.relative_to(root.parent)}:{line}"
            top = target.split(".")[0]
            for package, banned in PLAIN.items():
                if module.startswith(package) and top in banned:
                    problems.append(f"{where}: {module} imports {target}")
            if top != "grpo":
                continue
            there = layer_of(target, order)
            if there is not None and there > here:
                problems.append(f"{where}: {module} imports {target}, a layer above it")
    return problems


def test_every_import_points_down():
    assert violations(PACKAGE, layers()) == []


def test_every_module_is_listed_in_the_readme_layout():
    layout = REPO.joinpath("README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"(\w+\.py)\b", layout))
    missing = [
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and path.name not in listed
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("file", "line", "expected"),
    [
        ("algorithm/kl.py", "from grpo.model.loading import Policy", "a layer above it"),
        ("tasks/base.py", "from grpo.rollout import source", "a layer above it"),
        ("distributed.py", "import grpo.run.config", "a layer above it"),
        ("algorithm/loss.py", "import transformers", "imports transformers"),
    ],
)
def test_an_upward_import_is_caught(tmp_path, file, line, expected):
    """The check is not blind: the same tree with one import added fails it."""
    copy = tmp_path / "grpo"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / file
    target.write_text(target.read_text() + f"\n{line}\n")
    found = violations(copy, layers())
    assert len(found) == 1 and expected in found[0] and file in found[0]
