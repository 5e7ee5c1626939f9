"""Model comparison: the statistics, the JSON at the end of training, and the standalone script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, cli_env

from grpo.comparison import comparison_problems, comparison_result, format_table

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
    return {"completion": "x", "reward": reward, "parts": {}, "lenient": correct}


def check_stats_follow_from_problems(result: dict) -> None:
    """Both averages, improvement and its percentage, recomputed from the per-problem scores."""
    stats = result["comparison_stats"]
    assert set(stats) == STATS_FIELDS
    means = {}
    for side in ("original", "trained"):
        scores = [r["reward"] for p in result["problems"] for r in p[side]["responses"]]
        means[side] = sum(scores) / len(scores)
        assert stats[f"{side}_avg_score"] == pytest.approx(means[side])
        for p in result["problems"]:
            rewards = [r["reward"] for r in p[side]["responses"]]
            assert p[side]["avg_score"] == pytest.approx(sum(rewards) / len(rewards))
    for p in result["problems"]:
        assert p["improvement"] == pytest.approx(
            p["trained"]["avg_score"] - p["original"]["avg_score"]
        )
    assert stats["improvement"] == pytest.approx(means["trained"] - means["original"])
    if means["original"]:
        expected = 100 * stats["improvement"] / abs(means["original"])
        assert stats["improvement_percentage"] == pytest.approx(expected)
    else:
        assert stats["improvement_percentage"] is None


def test_stats_follow_from_the_scores():
    problems = comparison_problems(
        [{"question": "q1", "answer": "#### 1"}], [{"question": "q2", "answer": "x\n#### 2"}], 5
    )
    original = [[response(0.2), response(0.4)], [response(0.0), response(0.2, True)]]
    trained = [[response(0.6, True), response(0.8, True)], [response(0.4), response(0.2)]]
    result = comparison_result(problems, original, trained)
    check_stats_follow_from_problems(result)
    stats = result["comparison_stats"]
    assert stats["original_avg_score"] == pytest.approx(0.2)
    assert stats["improvement"] == pytest.approx(0.3)
    assert stats["improvement_percentage"] == pytest.approx(150.0)
    assert (stats["original_accuracy"], stats["trained_accuracy"]) == (0.25, 0.5)
    assert [p["ground_truth"] for p in result["problems"]] == ["1", "2"]
    table = format_table(result)
    assert "+0.300 (+150.0%)" in table and "q2" in table


def test_prompts_without_a_final_answer_are_refused():
    with pytest.raises(ValueError, match=r"eval.comparison.prompts\[1\]: .* '#### N'"):
        comparison_problems([{"question": "a", "answer": "#### 1"}, {"question": "b"}], [], 0)


def test_improvement_percentage_is_null_when_the_original_scores_zero():
    problems = [{"question": "q", "answer": "#### 1"}]
    result = comparison_result(problems, [[response(0.0)]], [[response(0.5)]])
    assert result["comparison_stats"]["improvement_percentage"] is None
    check_stats_follow_from_problems(result)


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
    check_stats_follow_from_problems(at_end)
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
