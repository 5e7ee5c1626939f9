"""Held-out evaluation: pass@k against a direct count, maj@k, the Evaluator on the tiny model."""

from __future__ import annotations

import itertools

import pytest
from conftest import compose_config, tiny_policy, tiny_task

from grpo.evaluation.heldout import majority_vote, pass_at_k, sample_metrics
from grpo.run.build import build_environment, build_evaluator, build_source, sampling_settings
from grpo.run.config import ConfigError, validate_config
from grpo.tasks.rewards import HybridReward

# Fixed samples for three problems whose answer is 7; True marks the correct ones (lenient).
SAMPLES = [
    (["#### 7", "#### 8", "no idea", "the answer is 7", "#### 6", "3 + 4 = 7"], "#### 7"),
    (["#### 1", "#### 2", "nothing", "#### 3", "#### 4", "#### 5"], "#### 7"),
    (["#### 7", "#### 7", "7", "#### 7.0", "\\boxed{7}", "#### 7"], "#### 7"),
]
CORRECT = [
    [True, False, False, True, False, True],
    [False] * 6,
    [True] * 6,
]


def direct_pass_at_k(correct: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def tiny_evaluator(task, *overrides: str):
    """The held-out evaluator of `model=tiny` on `task`, as the trainer builds it."""
    cfg = compose_config("model=tiny", *overrides)
    sampling = sampling_settings(cfg, task)
    source = build_source(
        cfg, task, tiny_policy(), HybridReward(), sampling, build_environment(cfg)
    )
    return build_evaluator(cfg, source, sampling)


@pytest.mark.parametrize("k", range(1, 7))
def test_pass_at_k_equals_direct_count_over_subsets(k):
    task = tiny_task()
    evaluator = tiny_evaluator(task, "eval.heldout.num_samples=6", f"eval.heldout.k={k}")
    records = [sample_metrics(task, texts, {"answer": answer}, k) for texts, answer in SAMPLES]
    for record, correct in zip(records, CORRECT, strict=True):
        assert record["samples_correct"] == correct
        assert record[f"pass@{k}"] == pytest.approx(direct_pass_at_k(correct, k), abs=1e-12)
    # The logged metric is the mean over problems (other keys are filled in for the means).
    filled = [{"reward": 0, "checks": {}, "length": 0, **r} for r in records]
    expected = sum(direct_pass_at_k(c, k) for c in CORRECT) / len(CORRECT)
    assert evaluator.metrics(filled)[f"eval/pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert evaluator.metrics(filled)["eval/pass@1"] == pytest.approx(sum(map(sum, CORRECT)) / 18)


def test_pass_at_k_is_exact_when_n_equals_k():
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 4, 4) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_maj_at_k_votes_over_the_first_k_samples():
    assert majority_vote([7.0, 8.0, 8.0, None, None]) == 1  # the first sample saying 8
    assert majority_vote([7.0, 8.0]) == 0  # a tie goes to the answer seen first
    assert majority_vote([None, None]) is None
    task, row = tiny_task(), {"answer": "#### 7"}
    texts = ["#### 8", "#### 7", "7", "#### 8", "#### 8"]
    assert sample_metrics(task, texts, row, 3)["maj@3"] == 1.0  # 7 and 7.0 vote together
    assert sample_metrics(task, texts, row, 5)["maj@5"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["eval.heldout.num_samples=2", "eval.heldout.k=3"], "eval.heldout.k"),
        (["eval.heldout.num_samples=-1"], "eval.heldout.num_samples"),
    ],
)
def test_bad_evaluation_settings_are_refused_before_loading(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(compose_config("model=tiny", *overrides))


def test_evaluator_on_tiny_model_batches_and_scores_every_problem():
    task = tiny_task(num_test=5)
    settings = ["eval.heldout.batch_size=4", "eval.heldout.num_samples=3", "eval.heldout.k=2"]
    evaluator = tiny_evaluator(task, "rollout.max_new_tokens=6", *settings)
    assert evaluator.greedy.max_new_tokens == 6  # null: the rollout's budget
    assert not evaluator.greedy.do_sample and evaluator.sampled.do_sample
    records = evaluator.records(task.test)
    metrics = evaluator(task.test)
    assert len(records) == 5
    for key in ("avg_reward", "avg_response_length", "avg_math_score", "pass@2", "maj@2"):
        assert f"eval/{key}" in metrics
    for key in task.check("", task.test[0]):
        assert f"eval/{key}" in metrics
    assert metrics["eval/avg_math_score"] == metrics["eval/accuracy_lenient"]
    for record in records:
        assert len(record["samples"]) == 3 and 1 <= record["length"] <= 6
        c = sum(record["samples_correct"])
        assert record["pass@2"] == pass_at_k(3, c, 2)
    mean_reward = sum(r["reward"] for r in records) / 5
    assert metrics["eval/avg_reward"] == pytest.approx(mean_reward)
