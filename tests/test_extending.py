"""docs/extending.md stays true: its code blocks marked `file=PATH mode=create|append` are applied
to a copy of the repository, then each section's `bash check` commands (pytest) and `bash train`
commands (with a tiny model, one step) run there, in subprocesses that import the copy's code.
The new names must then be in the copy's registries and config groups, the `console` error lines
of the page must be what the copy prints, and the page's reward and task must pay what it says."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, gsm8k_path

DOC = REPO / "docs" / "extending.md"
COPIED = ("grpo", "conf", "tests")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^## (.+)$", re.MULTILINE)
# Appended to each `bash train` command: a tiny random model, one step, no comparison.
TINY_RUN = (
    "model=tiny",
    "trainer.max_steps=1",
    "trainer.batch_size=2",
    "algorithm.num_responses_per_prompt=2",
    "rollout.max_new_tokens=8",
    "logging.progress_bar=false",
    "logging.plots=false",
    "eval.comparison.at_end=false",
)
TINY_TASK = ("task.num_train=16", "task.num_test=2")  # for tasks that have these settings
TIMEOUT = 300


@dataclass
class Section:
    """One `## ` section of the page: its file blocks and its check and train commands."""

    title: str
    files: list[tuple[str, str, str]] = field(default_factory=list)  # (path, mode, text)
    check: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


def sections(text: str) -> list[Section]:
    """The page's sections, in order, with their fenced blocks (info string: a language, then
    `key=value` attributes and bare flags such as `check` / `train`)."""
    heads = [(m.start(), m.group(1).strip()) for m in HEADING.finditer(text)]
    found = [Section("(top)")] + [Section(title) for _, title in heads]
    for block in FENCE.finditer(text):
        words = block.group(1).split()
        index = sum(start < block.start() for start, _ in heads)
        section, body = found[index], block.group(2)
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        flags = {w for w in words[1:] if "=" not in w}
        if "file" in attrs:
            section.files.append((attrs["file"], attrs.get("mode", ""), body))
        elif words[:1] == ["bash"] and flags & {"check", "train"}:
            lines = [line.strip() for line in body.splitlines()]
            commands = [line for line in lines if line and not line.startswith("#")]
            getattr(section, "check" if "check" in flags else "train").extend(commands)
        elif words[:1] == ["console"]:
            section.console.append(body)
    return [s for s in found if s.files or s.check or s.train]


SECTIONS = sections(DOC.read_text())


def slug(section: Section) -> str:
    return re.sub(r"[^a-z0-9]+", "_", section.title.lower()).strip("_")[:40]


def apply(root: Path) -> None:
    """Every file block of the page, in order: `create` a new file or `append` to one."""
    for section in SECTIONS:
        for path, mode, text in section.files:
            target = root / path
            if mode == "create":
                assert not target.exists(), f"{path}: `mode=create` but it exists already"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
            elif mode == "append":
                assert target.is_file(), f"{path}: `mode=append` but there is no such file"
                target.write_text(target.read_text().rstrip("\n") + "\n\n\n" + text)
            else:
                raise AssertionError(f"{path}: mode must be create or append, got {mode!r}")


def environment(root: Path) -> dict[str, str]:
    """tests/conftest.py's CLI environment, importing the copy's code (not the checkout's);
    the copy lies elsewhere, so it is told where this machine's GSM8K is."""
    env = cli_env()
    env["PYTHONPATH"] = str(root)
    if (gsm8k := gsm8k_path()) is not None:
        env["GRPO_GSM8K_DIR"] = str(gsm8k)
    return env


def run(root: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`args` in a subprocess from the copy; an AssertionError with the output tail on failure."""
    proc = subprocess.run(
        args,
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"{shlex.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
        f"{proc.stderr[-4000:]}"
    )
    return proc


def python_command(line: str, module: str) -> list[str]:
    """`python -m MODULE ...` from the page, run with this interpreter."""
    args = shlex.split(line, comments=True)
    assert args[:3] == ["python", "-m", module], f"expected `python -m {module} ...`: {line}"
    return [sys.executable, *args[1:]]


def task_of(root: Path, args: list[str]) -> str:
    """The task a train command uses: its `task=` override or train.yaml's default."""
    for arg in args:
        if arg.startswith("task="):
            return arg.split("=", 1)[1]
    defaults = yaml.safe_load((root / "conf" / "train.yaml").read_text())["defaults"]
    return next(d["task"] for d in defaults if isinstance(d, dict) and "task" in d)


# The probe: run once in the copy after the page is applied; prints one JSON object.
PROBE = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import grpo
from grpo.algorithm.advantages import ADVANTAGE_ESTIMATORS
from grpo.algorithm.policy_losses import POLICY_LOSSES
from grpo.environments.base import ENVIRONMENTS
from grpo.rollout.backends import BACKENDS
from grpo.run.config import ConfigError, validate_config

CONF = Path("conf").resolve()
request = json.loads(sys.argv[1])


def given(question):  # the list of numbers a Countdown question shows
    return json.loads(question[question.index("[") : question.index("]") + 1])


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


GROUPS = ("algorithm/policy_loss", "algorithm/advantage", "reward", "task", "environment")
out = {
    "grpo": grpo.__file__,
    "policy_losses": list(POLICY_LOSSES),
    "advantages": list(ADVANTAGE_ESTIMATORS),
    "backends": list(BACKENDS),
    "environments": list(ENVIRONMENTS),
    "groups": {
        group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for group in GROUPS
    },
    "errors": [],
}
for overrides in request["errors"]:
    try:
        validate_config(config(*overrides))
        out["errors"].append(None)
    except ConfigError as error:
        out["errors"].append(str(error))

# Section 3: the echo penalty, on an arithmetic problem's prompt as the model sees it.
task = instantiate(config("task=arithmetic", "task.num_train=4", "task.num_test=1").task)
row = task.test[0]
right = task.reference_completion(row)
echo = instantiate(config("reward=echo_penalty").reward)
texts = [right, row["question"] + "\n" + right]
scores = echo(texts, [task.answer(row)] * 2, [task.prompt(row)] * 2)
out["echo"] = {"totals": scores.total, "parts": sorted(scores.parts)}

# Section 4: Countdown, small splits built twice, its default reward, and fixed answers.
cfg = config("task=countdown", "task.num_train=200", "task.num_test=20")
validate_config(cfg)
first, again = instantiate(cfg.task), instantiate(cfg.task)
reward = instantiate(cfg.reward)
rows = first.train + first.test + first.examples
texts, puzzle = request["completions"], {"question": "", "answer": request["answer"]}
out["countdown"] = {
    "reward_target": cfg.reward._target_,
    "sizes": [len(first.train), len(first.test)],
    "seeded": first.train == again.train and first.test == again.test,
    "overlap": len({r["question"] for r in first.train} & {r["question"] for r in first.test}),
    "own_answers_solve": all(first.correct(first.reference_completion(r), r) for r in rows),
    "counts": sorted({len(given(r["question"])) for r in first.train}),
    "totals": reward(texts, [puzzle["answer"]] * len(texts)).total,
    "checks": [first.check(text, puzzle) for text in texts[:2]],
    "prompt": first.prompt(first.test[0]),
}
# Section 6: the unit bonus on a test row of data/units, with the columns the rollout source
# passes (Task.columns of each completion's row).
cfg = config("task=gsm8k_dataset", "task.path=data/units", "reward=units")
validate_config(cfg)
task, units = instantiate(cfg.task), instantiate(cfg.reward)
row, texts = task.test[0], request["unit_completions"]
n = len(texts)
answers, prompts = [task.answer(row)] * n, [task.prompt(row)] * n
scores = units(texts, answers, prompts, columns=[task.columns(row)] * n)
out["units"] = {
    "totals": scores.total,
    "parts": sorted(scores.parts),
    "columns": [task.columns(r) for r in task.test],
}
print(json.dumps(out))
"""

# Section 4's reward on the puzzle 3 4 5 -> 35: a completion and what it must be paid.
COUNTDOWN_ANSWER = "(3 + 4) * 5 = 35"
COUNTDOWN_PAYS = {
    "Work: 3 + 4 = 7, 7 * 5 = 35. <answer>(3 + 4) * 5</answer>": 1.1,
    "<answer>5 * (4 + 3)</answer>": 1.1,  # any order, any right equation
    "<answer>3 + 4 + 5</answer>": 0.1,  # well formed, wrong value
    "<answer>(3 + 4) * 5 * 1</answer>": 0.1,  # a number that is not given
    "<answer>7 * 5</answer>": 0.1,  # the given numbers not used
    "<answer>35</answer>": 0.1,
    "<answer>(3 + 4) * 5</answer><answer>(3 + 4) * 5</answer>": 1.0,  # two tags: no format bonus
    "(3 + 4) * 5": 0.0,  # no tag
    "<answer>(3 + 4) ** 5</answer>": 0.0,  # a power
    "<answer>-(3 + 4) * -5</answer>": 0.0,  # signs
    "<answer>1 / 0</answer>": 0.0,
    "<answer>__import__('os').system('exit 3')</answer>": 0.0,  # never run as code
    "<answer>(3 + 4) * 5.0</answer>": 0.0,  # decimals
}


# Section 6's reward on the test row "A road is 7 km long...": a completion and what it is paid.
UNITS_PAYS = {"7 * 3 = 21 km\n#### 21": 1.1, "#### 21": 1.0, "#### 5 km": 0.1, "#### 5": 0.0}


def console_errors() -> list[tuple[list[str], str]]:
    """(overrides, error line) of each `$ python -m grpo.train ...` in the page's console
    blocks, followed by its `error: ...` line."""
    found = []
    for section in SECTIONS:
        for body in section.console:
            lines = body.strip().splitlines()
            for command, output in zip(lines, lines[1:], strict=False):
                if command.startswith("$ python -m grpo.train ") and output.startswith("error: "):
                    overrides = shlex.split(command.removeprefix("$ python -m grpo.train "))
                    found.append((overrides, output.removeprefix("error: ")))
    return found


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The repository's code, configs and tests in a temporary folder, the page applied."""
    root = tmp_path_factory.mktemp("extending") / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=skip)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    apply(root)
    return root


@pytest.fixture(scope="module")
def probe(copy) -> dict:
    """What the copy's registries, config groups, error messages, reward and task say."""
    request = {
        "errors": [overrides for overrides, _ in console_errors()],
        "completions": list(COUNTDOWN_PAYS),
        "answer": COUNTDOWN_ANSWER,
        "unit_completions": list(UNITS_PAYS),
    }
    proc = run(copy, [sys.executable, "-c", PROBE, json.dumps(request)])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_page_has_seven_sections_each_with_code_a_check_and_a_training_command():
    assert len(SECTIONS) == 7, [s.title for s in SECTIONS]
    for section in SECTIONS:
        assert section.files and section.check and section.train, section.title


def test_the_new_names_are_registered_in_the_copy(probe, copy):
    assert Path(probe["grpo"]).is_relative_to(copy)  # the copy's code, not the checkout's
    assert "reinforce" in probe["policy_losses"] and "clip" in probe["policy_losses"]
    assert "group_median" in probe["advantages"] and "grpo" in probe["advantages"]
    assert "min_p" in probe["backends"] and "lean" in probe["backends"]
    groups = probe["groups"]
    assert "reinforce" in groups["algorithm/policy_loss"]
    assert "group_median" in groups["algorithm/advantage"]
    assert {"echo_penalty", "countdown", "units"} <= set(groups["reward"])
    assert "countdown" in groups["task"]
    assert "retry" in probe["environments"] and "python_tool" in probe["environments"]
    assert "retry" in groups["environment"]


def test_the_error_lines_of_the_page_are_what_the_copy_prints(probe):
    expected = console_errors()
    assert expected, "the page shows no `error:` line"
    for (overrides, line), got in zip(expected, probe["errors"], strict=True):
        assert got is not None, f"{overrides}: no config error"
        if "registered: " in line:  # later entries may join the list the page shows
            head, names = line.split("registered: ")
            got_head, got_names = got.split("registered: ")
            assert got_head == head and set(names.split(", ")) <= set(got_names.split(", "))
        else:
            assert got == line


def test_the_echo_penalty_takes_a_tenth_off_a_repeated_question(probe):
    assert probe["echo"]["parts"] == ["correctness", "echo"]
    assert probe["echo"]["totals"] == pytest.approx([1.0, 0.9])


def test_countdown_rows_are_seeded_and_solvable_and_its_reward_pays_what_the_page_says(probe):
    countdown = probe["countdown"]
    assert countdown["reward_target"] == "grpo.tasks.countdown.CountdownReward"
    assert countdown["sizes"] == [200, 20] and countdown["seeded"]
    assert countdown["overlap"] == 0 and countdown["own_answers_solve"]
    assert countdown["counts"] == [3, 4]
    assert "<answer>" in countdown["prompt"]
    assert countdown["totals"] == pytest.approx(list(COUNTDOWN_PAYS.values()))
    right, other_order = countdown["checks"]
    assert right == other_order == {"accuracy_strict": 1.0, "well_formed": 1.0}


def test_the_reward_function_gets_the_rows_columns_and_pays_what_the_page_says(probe):
    units = probe["units"]
    assert units["columns"] == [{"unit": "km"}, {"unit": "liters"}]
    assert units["parts"] == ["correctness", "unit"]
    assert units["totals"] == pytest.approx(list(UNITS_PAYS.values()))


@pytest.mark.parametrize("section", SECTIONS, ids=slug)
def test_each_section_is_covered_by_its_checks_and_trains(section, copy, tmp_path):
    for line in section.check:
        proc = run(copy, [*python_command(line, "pytest"), "-p", "no:cacheprovider", "-q"])
        assert re.search(r"\b\d+ passed\b", proc.stdout), proc.stdout[-2000:]
    for i, line in enumerate(section.train):
        args = python_command(line, "grpo.train")
        task = yaml.safe_load((copy / "conf" / "task" / f"{task_of(copy, args)}.yaml").read_text())
        sizes = TINY_TASK if {"num_train", "num_test"} <= set(task) else ()
        run_dir = tmp_path / f"run{i}"
        run(copy, [*args, *TINY_RUN, *sizes, f"hydra.run.dir={run_dir}"])
        assert (run_dir / "metrics.jsonl").read_text().strip(), f"{line}: no metrics.jsonl"
