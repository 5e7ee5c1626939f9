"""task=dataset: GSM8K through the generic task is task=gsm8k (every prompt, every check), local
files of every format through the real `datasets.load_dataset`, column mapping, templates, chat
messages, held-out rows, every answer checker of the registry (and a function by dotted path),
bad input stopped with one line naming the key and the file, and a short training run whose
reward function receives the rows' columns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, compose_config, run_train, step_lines
from hydra.utils import instantiate

from grpo.run.config import ConfigError, validate_config
from grpo.tasks.base import DATA_FILES
from grpo.tasks.dataset import ANSWER_CHECKERS, CheckerReward, DatasetTask, build_checker
from grpo.train import train

ROWS = [
    {"question": "What is the capital of France?", "answer": "Paris", "level": 1},
    {"question": "What is the capital of Italy?", "answer": "Rome", "level": 2},
    {"question": "What is the capital of Spain?", "answer": "Madrid", "level": 1},
    {"question": "What is the capital of Peru?", "answer": "Lima", "level": 3},
]


def write(folder: Path, split: str, rows: list[dict], ext: str = "jsonl") -> Path:
    """`rows` as folder/SPLIT.EXT in the format the extension names."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{split}.{ext}"
    frame = pd.DataFrame(rows)
    if ext == "jsonl":
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == "json":
        file.write_text(json.dumps(rows))
    elif ext == "parquet":
        frame.to_parquet(file)
    elif ext == "csv":
        frame.to_csv(file, index=False)
    else:
        raise AssertionError(f"no writer for .{ext}: add one here")
    return file


@pytest.fixture
def data(tmp_path) -> Path:
    """A folder with train.jsonl (ROWS) and test.jsonl (the first two rows)."""
    write(tmp_path / "data", "train", ROWS)
    write(tmp_path / "data", "test", ROWS[:2])
    return tmp_path / "data"


# ------------------------------------------------------------------------ GSM8K, twice
def synthetic_completions(truth: str) -> list[str]:
    """Completions around the right number `truth`: right, wrong, in every format the checks
    read, repeated, empty."""
    return [
        f"#### {truth}",
        f"So that is {truth} in all.\n#### {truth}\n",
        f"The answer is {truth}.",
        f"\\boxed{{{truth}}}",
        f"{truth}",
        f"I think {truth}, not 3... #### 3",
        f"#### {truth}\n#### {truth}",
        "#### 1,000,000",
        "I do not know.",
        "",
    ]


def test_gsm8k_through_task_dataset_is_task_gsm8k(gsm8k_dir):
    generic_cfg = compose_config("task=gsm8k_dataset", f"task.path={gsm8k_dir}")
    gsm8k_cfg = compose_config("task=gsm8k", f"task.path={gsm8k_dir}")
    validate_config(generic_cfg)
    generic, gsm8k = instantiate(generic_cfg.task), instantiate(gsm8k_cfg.task)
    assert generic_cfg.reward == gsm8k_cfg.reward  # the same default reward
    assert (generic.stop_pattern, generic.system_prompt) == (gsm8k.stop_pattern, None)
    assert generic.skipped == gsm8k.skipped == {"train": 0, "test": 0}
    assert (len(generic.train), len(generic.test)) == (7473, 200)
    for split in ("train", "test"):
        pairs = list(zip(getattr(generic, split), getattr(gsm8k, split), strict=True))
        for mine, theirs in pairs:
            assert (mine["question"], mine["answer"]) == (theirs["question"], theirs["answer"])
            assert generic.messages(mine) == gsm8k.messages(theirs)
            assert generic.prompt(mine) == gsm8k.prompt(theirs)
            assert generic.answer(mine) == gsm8k.answer(theirs)
            assert generic.ground_truth(mine) == gsm8k.ground_truth(theirs)
            solution = gsm8k.reference_completion(theirs)
            assert generic.reference_completion(mine) == solution
            assert generic.check(solution, mine) == gsm8k.check(solution, theirs)
    for mine, theirs in zip(generic.test, gsm8k.test, strict=True):
        for text in synthetic_completions(gsm8k.ground_truth(theirs)):
            assert generic.check(text, mine) == gsm8k.check(text, theirs), text
            assert generic.correct(text, mine) == gsm8k.correct(text, theirs), text
            assert generic.answer_of(text) == gsm8k.answer_of(text), text


# ------------------------------------------------------------------------ files and columns
@pytest.mark.parametrize("ext", list(DATA_FILES))
def test_every_file_format_loads_the_same_rows(ext, tmp_path):
    write(tmp_path, "train", ROWS, ext)
    write(tmp_path, "test", ROWS[:2], ext)
    task = DatasetTask(path=str(tmp_path), template="Q: {question} (level {level})")
    assert [r["answer"] for r in task.train] == ["Paris", "Rome", "Madrid", "Lima"]
    assert [r["answer"] for r in task.test] == ["Paris", "Rome"]
    row = task.train[1]
    assert task.columns(row) == {"level": 2}
    assert task.prompt(row) == "Q: What is the capital of Italy? (level 2)"
    assert task.messages(row) == [{"role": "user", "content": task.prompt(row)}]


def test_columns_are_mapped_and_numbers_become_text(tmp_path):
    rows = [{"problem": f"{a} + {a}?", "solution": 2 * a, "source": "gen"} for a in range(3)]
    write(tmp_path, "train", rows, "csv")
    task = DatasetTask(
        path=str(tmp_path), test_split=None, num_test=1, prompt_key="problem", answer_key="solution"
    )
    assert task.test == [{"question": "0 + 0?", "answer": "0", "columns": {"source": "gen"}}]
    assert [r["answer"] for r in task.train] == ["2", "4"]
    assert task.prompt(task.train[0]) == "1 + 1?"  # no template: the prompt column as is
    assert task.correct(" 4\n", task.train[1]) and not task.correct("4.0", task.train[1])


def test_held_out_rows_limits_and_system_prompt(data):
    task = DatasetTask(path=str(data), test_split="train", num_test=1, max_train_samples=2)
    assert [r["answer"] for r in task.test] == ["Paris"]
    assert [r["answer"] for r in task.train] == ["Rome", "Madrid"]
    limited = DatasetTask(path=str(data), num_test=1, system_prompt="Be brief.")
    assert [r["answer"] for r in limited.test] == ["Paris"] and len(limited.train) == 4
    assert limited.messages(limited.test[0])[0] == {"role": "system", "content": "Be brief."}


def test_chat_messages_are_used_as_they_are(tmp_path):
    def chat(question: str) -> list[dict]:
        return [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": question},
        ]

    rows = [{"prompt": chat(r["question"]), "answer": r["answer"]} for r in ROWS]
    write(tmp_path, "train", rows)
    task = DatasetTask(
        path=str(tmp_path),
        test_split=None,
        num_test=1,
        prompt_key=None,
        messages_key="prompt",
        system_prompt="You are a geographer.",
    )
    row = task.train[0]
    assert task.messages(row) == [
        {"role": "system", "content": "You are a geographer."},
        *chat("What is the capital of Italy?"),
    ]
    assert row["question"] == task.prompt(row) == "What is the capital of Italy?"
    assert task.columns(row) == {}
    # The model comparison's fixed problems carry a question and an answer only.
    assert task.messages({"question": "q", "answer": "a"})[-1] == {"role": "user", "content": "q"}


def test_skip_invalid_drops_and_counts_rows_the_checker_refuses(tmp_path):
    rows = [{"question": "q1", "answer": "#### 4"}, {"question": "q2", "answer": "four"}]
    write(tmp_path, "train", rows + [{"question": "q3", "answer": None}])
    write(tmp_path, "test", rows)
    settings = {"path": str(tmp_path), "checker": {"name": "gsm8k"}}
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: answer has no parsable final"):
        DatasetTask(**settings)
    task = DatasetTask(**settings, skip_invalid=True)
    assert [r["question"] for r in task.train] == ["q1"] and len(task.test) == 1
    assert task.skipped == {"train": 2, "test": 1}


# ------------------------------------------------------------------------ answer checkers
# For each registered checker: its settings, a ground truth, a completion it must count right,
# and one it must count wrong. A new checker needs a line here (the first test says so).
CHECKER_CASES = {
    "gsm8k": ({}, "3 + 4 = 7\n#### 7", "so 7 apples\n#### 7", "#### 8"),
    "math_verify": ({}, "\\frac{1}{2}", "It is $\\boxed{0.5}$.", "$\\boxed{2}$"),
    "exact": ({}, "Paris", "  Paris\n", "paris"),
    "regex": ({"pattern": r"Answer: (\w+)"}, "B", "Answer: A... no. Answer: B", "Answer: A"),
}


def test_every_registered_checker_has_a_case():
    assert sorted(CHECKER_CASES) == list(ANSWER_CHECKERS)


@pytest.mark.parametrize("name", list(ANSWER_CHECKERS))
def test_every_checker_counts_right_and_wrong_answers(name):
    settings, answer, right, wrong = CHECKER_CASES[name]
    checker = build_checker({"name": name, **settings}, "task.checker")
    assert checker.problem(answer) is None
    assert checker.correct(right, answer) and not checker.correct(wrong, answer)
    assert checker.scores(right, answer)["accuracy_strict"] == 1.0
    assert checker.scores(wrong, answer)["accuracy_strict"] == 0.0
    assert checker.answer_of(right) is not None and checker.answer_of(right) != checker.answer_of(
        wrong
    )
    reward = CheckerReward({"name": name, **settings})
    assert reward([right, wrong], [answer, answer]).parts == {"correctness": [1.0, 0.0]}
    if name != "regex":  # a pattern's answer is in the completion's words, not the answer's
        assert checker.correct(checker.reference(answer), answer)


def test_regex_checker_reads_the_last_match_and_needs_one_group():
    checker = build_checker({"name": "regex", "pattern": r"<answer>(.*?)</answer>"}, "k")
    assert checker.answer_of("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert checker.answer_of("no tag") is None
    with pytest.raises(ValueError, match=r"^task.checker.pattern='\(a\)\(b\)': needs one group"):
        build_checker({"name": "regex", "pattern": "(a)(b)"}, "task.checker")
    with pytest.raises(ValueError, match=r"^task.checker: answer checker 'regex' needs pattern"):
        build_checker({"name": "regex"}, "task.checker")


def test_a_function_by_dotted_path_is_a_checker(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def close(completion, answer, tolerance=0.0):\n"
        "    try:\n"
        "        return abs(float(completion) - float(answer)) <= tolerance\n"
        "    except ValueError:\n"
        "        return False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checker = build_checker({"name": "my_checks.close", "tolerance": 0.1}, "task.checker")
    assert checker.correct("3.05", "3") and not checker.correct("3.2", "3")
    assert checker.scores("3", "3") == {"accuracy_strict": 1.0}
    assert checker.answer_of(" 3\n") == "3"  # maj@k votes on the stripped completion
    with pytest.raises(ValueError, match=r"task.checker.name='my_checks.close': cannot be called"):
        build_checker({"name": "my_checks.close", "tol": 0.1}, "task.checker")
    with pytest.raises(ValueError, match=r"task.checker.name='my_checks.far': module 'my_checks'"):
        build_checker({"name": "my_checks.far"}, "task.checker")


# ------------------------------------------------------------------------ bad input
def bad_input_cases(folder: Path) -> list[tuple[dict, str]]:
    train = folder / "train.jsonl"
    return [
        (
            {"answer_key": "label"},
            f"task.answer_key='label': not a column of {train} (columns: question, answer, level)",
        ),
        ({"prompt_key": "problem"}, f"task.prompt_key='problem': not a column of {train}"),
        (
            {"template": "{question} ({topic})"},
            f"task.template key 'topic': not a column of {train} (columns: question, answer",
        ),
        ({"template": "{question} {}"}, "task.template='{question} {}': each {...} must name a"),
        ({"template": "{question"}, "task.template='{question': not a format string"),
        (
            {"checker": {"name": "nope"}},
            "task.checker.name='nope': unknown answer checker; registered: "
            + ", ".join(ANSWER_CHECKERS),
        ),
        ({"checker": {"name": "exact", "x": 1}}, "task.checker.x: not a setting of answer checker"),
        ({"test_split": "validation"}, "task.path="),
        ({"test_split": None}, "task.num_test=None: needed to hold out rows of task.train_split"),
        ({"test_split": None, "num_test": 4}, "task.num_test=4: leaves no training rows of the 4"),
        ({"messages_key": "question"}, "task.prompt_key='question', task.messages_key='question'"),
        ({"stop_pattern": "(("}, "task.stop_pattern='((': not a regex"),
        ({"path": None}, "task.path=None, task.hub_id=None: set a local folder or a hub id"),
    ]


def test_bad_input_stops_with_one_line_naming_the_key_and_the_file(data):
    for settings, message in bad_input_cases(data):
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            DatasetTask(**{"path": str(data), **settings})
        assert message in str(error.value) and "\n" not in str(error.value), settings


@pytest.mark.parametrize("ext", list(DATA_FILES))
def test_an_empty_split_is_named_with_its_file(ext, tmp_path):
    write(tmp_path, "train", ROWS, ext)
    file = write(tmp_path, "test", [], ext)  # jsonl: an empty file; json: []; csv: no header
    if ext in ("parquet", "csv"):  # with its columns but no rows
        empty = pd.DataFrame({"question": pd.Series([], dtype=str)})
        empty.to_parquet(file) if ext == "parquet" else empty.to_csv(file, index=False)
    with pytest.raises(ValueError) as error:
        DatasetTask(path=str(tmp_path))
    assert str(error.value) == f"task.path={str(tmp_path)!r}: test file {file}: no rows"


def test_a_row_without_an_answer_is_named_by_its_line(tmp_path):
    write(tmp_path, "train", ROWS[:1] + [{"question": "q"}])
    write(tmp_path, "test", ROWS[:1])
    with pytest.raises(ValueError, match=r"train.jsonl, line 2: no answer \(task.answer_key="):
        DatasetTask(path=str(tmp_path))


def test_a_chat_prompt_must_end_with_the_user(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris"}]
    write(tmp_path, "train", [{"messages": chat, "answer": "Paris"}] * 2)
    with pytest.raises(ValueError, match=r"line 1: task.messages_key='messages': the last message"):
        DatasetTask(
            path=str(tmp_path),
            test_split=None,
            num_test=1,
            prompt_key=None,
            messages_key="messages",
        )


def task_overrides(data: Path) -> list[str]:
    """TINY without the arithmetic task's settings, on task=dataset with `data`."""
    tiny = [o for o in TINY if not o.startswith("task.")]
    return [*tiny, "task=dataset", f"task.path={data}"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.checker.name=nope"], "task.checker.name='nope': unknown answer checker"),
        (["reward.checker.name=regex"], "reward.checker: answer checker 'regex' needs pattern"),
        (["reward.checker.name=gsm8k"], "reward.checker={'name': 'gsm8k'}: reward=checker pays"),
        (["reward=function", "reward.function=no_such.fn"], "reward.function='no_such.fn': cannot"),
    ],
)
def test_the_config_checks_checkers_and_functions_before_anything_loads(overrides, message, data):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        validate_config(compose_config(*task_overrides(data), *overrides))


def test_cli_stops_on_a_missing_column_before_loading_the_model(data, tmp_path):
    run_dir = tmp_path / "run"
    args = [*task_overrides(data), "task.answer_key=label", f"hydra.run.dir={run_dir}"]
    proc = run_train(*args, check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert lines == [
        f"error: task.answer_key='label': not a column of {data / 'train.jsonl'} "
        "(columns: question, answer, level)"
    ]
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------ training
REWARD_MODULE = '''
import json

SEEN = {path!r}


def level_bonus(completions, answers, prompts, level, **columns):
    """0.1 x the row's level: reads a column of the rows; records what it was given."""
    with open(SEEN, "a") as out:
        out.write(json.dumps({{"answers": answers, "level": level, "n": len(prompts)}}) + "\\n")
    return [0.1 * value for value in level]
'''


def test_task_dataset_trains_and_its_reward_function_gets_the_columns(data, tmp_path, monkeypatch):
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "level_rewards.py").write_text(REWARD_MODULE.format(path=str(seen)))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config(
        *task_overrides(data),
        "reward=function",
        "reward.function=level_rewards.level_bonus",
        "eval.comparison.at_end=false",
    )
    validate_config(cfg)
    train(cfg, tmp_path / "run")
    lines = step_lines(tmp_path / "run")
    assert len(lines) == 2 and "rewards/level_bonus" in lines[0]
    by_answer = {row["answer"]: row["level"] for row in ROWS}
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert calls and all(c["n"] == len(c["answers"]) == len(c["level"]) for c in calls)
    for call in calls:  # each completion's own row's level, G completions a prompt in a row
        assert call["level"] == [by_answer[a] for a in call["answers"]]
    assert any(len(c["answers"]) == 4 for c in calls)  # a training batch: 2 prompts x G = 2
