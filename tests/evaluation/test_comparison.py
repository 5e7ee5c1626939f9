"""Model comparison: the statistics, the JSON at the end of training, and the standalone script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, cli_env, compose_config, tiny_task

from grpo.evaluation.comparison import (
    comparison_problems,
    comparison_result,
    format_table,
    relative_change,
)
from grpo.run.config import ConfigError, validate_config

SCRIPT = REPO / "scripts" / "compare_models.py"
SEED_QUESTIONS = [
    "What is 15 + 27?",
    "Solve for x: 2x + 5 = 13",
    "What is the area of a rectangle with length 8 and width 6?",
]
STATS_FIELDS = {
    "num_problems",
    "num_responses_per_prompt",
    "original_avg_score",
    "trained_avg_score",
    "improvement",
    "improvement_percentage",
    "original_accuracy",
    "trained_accuracy",
}


def response(reward: float, correct: bool = False) -> dict:
    return {"completion": "x", "reward": reward, "parts": {}, "correct": correct}


def test_stats_follow_from_the_scores():
    problems = comparison_problems(
        [{"question": "q1", "answer": "#### 1"}], [{"question": "q2", "answer": "x\n#### 2"}], 5
    )
    original = [[response(0.2), response(0.4)], [response(0.0), response(0.2, True)]]
    trained = [[response(0.6, True), response(0.8, True)], [response(0.4), response(0.2)]]
    result = comparison_result(tiny_task(), problems, original, trained)
    stats = result["comparison_stats"]
    assert set(stats) == STATS_FIELDS
    assert [p["original"]["avg_score"] for p in result["problems"]] == pytest.approx([0.3, 0.1])
    assert [p["improvement"] for p in result["problems"]] == pytest.approx([0.4, 0.2])
    assert stats["original_avg_score"] == pytest.approx(0.2)
    assert stats["trained_avg_score"] == pytest.approx(0.5)
    assert stats["improvement"] == pytest.approx(0.3)
    assert stats["improvement_percentage"] == pytest.approx(150.0)
    assert (stats["original_accuracy"], stats["trained_accuracy"]) == (0.25, 0.5)
    assert [p["ground_truth"] for p in result["problems"]] == ["1", "2"]
    table = format_table(result)
    assert "+0.300 (+150.0%)" in table and "q2" in table


def test_prompts_without_an_answer_are_refused_before_loading():
    cfg = compose_config("eval.comparison.prompts=[{question: a, answer: '#### 1'}, {question: b}]")
    with pytest.raises(ConfigError, match=r"eval.comparison.prompts\[1\]=.* needs a question"):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("before", "after", "percent"),
    [
        (0.2, 0.5, 150.0),
        (0.5, 0.2, -60.0),
        (-0.4, -0.2, 50.0),
        (0.0, 0.5, None),
        (0.006, 0.253, None),  # the quickstart's comparison: "+3950%" says nothing
        (0.03, 0.3, 900.0),  # a tenth of the larger value: still shown
    ],
)
def test_a_relative_change_only_from_a_meaningful_baseline(before, after, percent):
    assert relative_change(before, after) == (None if percent is None else pytest.approx(percent))


def test_the_table_always_gives_the_absolute_change():
    problems = [{"question": "q", "answer": "#### 1"}]
    result = comparison_result(tiny_task(), problems, [[response(0.006)]], [[response(0.253)]])
    stats = result["comparison_stats"]
    assert stats["improvement"] == pytest.approx(0.247)
    assert stats["improvement_percentage"] is None
    average = next(x for x in format_table(result).splitlines() if "average" in x)
    assert average.rstrip().endswith("+0.247") and "%" not in average


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_comparison_at_the_end_and_from_the_script_agree(tiny_run, lora):
    """The JSON written by training; then the script reloads the run and gets the same answers."""
    run_dir, proc = tiny_run(
        f"model.lora.enabled={str(lora).lower()}",
        "trainer.learning_rate=0.01",
        "algorithm.loss.entropy_coef=0.5",  # a gradient even when all rewards of a group agree
        "eval.comparison.num_heldout=2",
        "eval.heldout.num_samples=0",
        "logging.plots=false",
    )
    at_end = json.loads((run_dir / "comparison.json").read_text())
    assert [p["question"] for p in at_end["problems"]][:3] == SEED_QUESTIONS
    assert [p["ground_truth"] for p in at_end["problems"]][:3] == ["42", "4", "48"]
    assert len(at_end["problems"]) == 5
    assert at_end["comparison_stats"]["num_responses_per_prompt"] == 2  # algorithm's G (TINY)
    assert "model comparison" in proc.stdout and "average" in proc.stdout

    texts = {
        side: [[r["completion"] for r in p[side]["responses"]] for p in at_end["problems"]]
        for side in ("original", "trained")
    }
    assert texts["original"] != texts["trained"]  # training moved the model

    (run_dir / "comparison.json").unlink()
    script = subprocess.run(
        [sys.executable, str(SCRIPT), str(run_dir), "trainer.device=cpu"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert script.returncode == 0, script.stderr[-3000:]
    again = json.loads((run_dir / "comparison.json").read_text())
    for side in ("original", "trained"):
        again_texts = [[r["completion"] for r in p[side]["responses"]] for p in again["problems"]]
        assert again_texts == texts[side]
    assert again["comparison_stats"] == at_end["comparison_stats"]


def test_script_names_a_folder_that_is_not_a_run(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_models", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(FileNotFoundError, match="config.yaml not found: is .* a grpo run folder"):
        script.load_run_config(tmp_path, [])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(FileNotFoundError, match="model not found: the run did not finish"):
        script.load_run_config(tmp_path, [])
