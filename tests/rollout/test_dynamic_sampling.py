"""Dynamic sampling (DAPO): only groups with reward spread, refill rounds, the cap, padding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_policy, tiny_task

from grpo.actor.logprobs import token_logprobs
from grpo.algorithm.advantages import group_reward_spread
from grpo.batch import RewardOutput, Rollout, ScoredRollout, concat
from grpo.rollout.dynamic_sampling import sample_groups
from grpo.rollout.lean import LeanBackend
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource
from grpo.tasks.rewards import CorrectnessReward

G = 2
PAD = 0


def scored(tag: str, group_rewards: list[list[float]], width: int = 3) -> ScoredRollout:
    """A hand-made batch: row i of group k is named f"{tag}{k}.{j}" in its text and data row."""
    names = [f"{tag}{k}.{j}" for k, group in enumerate(group_rewards) for j in range(len(group))]
    n = len(names)
    ids = torch.arange(1, n + 1).unsqueeze(1).repeat(1, width)
    rollout = Rollout(
        prompt_ids=ids.clone(),
        prompt_mask=torch.ones(n, width, dtype=torch.long),
        completion_ids=ids.clone(),
        completion_mask=torch.ones(n, width, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        texts=names,
        pad_token_id=PAD,
    )
    total = [r for group in group_rewards for r in group]
    scores = RewardOutput(total=total, parts={"correctness": total})
    rows = [{"question": name, "answer": "#### 1"} for name in names]
    return ScoredRollout(rows, rollout, scores, generate_s=1.0)


def drawer(*batches: ScoredRollout):
    """draw() returning the batches in turn, counting calls; fails if asked for one more."""
    queue = list(batches)
    calls = []

    def draw() -> ScoredRollout:
        calls.append(1)
        return queue.pop(0)

    return draw, calls


def assert_aligned(batch: ScoredRollout) -> None:
    assert [r["question"] for r in batch.rows] == batch.rollout.texts
    assert len(batch.scores.total) == batch.rollout.completion_ids.shape[0]


def test_keeps_only_groups_with_spread():
    draw, calls = drawer(scored("a", [[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.25]]))
    batch, stats = sample_groups(draw, 3, G, enabled=True, max_extra_rounds=5)
    assert len(calls) == 1
    assert batch.rollout.texts == ["a1.0", "a1.1", "a3.0", "a3.1", "a4.0", "a4.1"]
    assert (group_reward_spread(batch.rewards, G) > 0).all()
    assert batch.scores.parts["correctness"] == batch.scores.total
    assert stats == {
        "sampling_rounds": 1.0,
        "sampling_dropped_groups": 2.0,
        "sampling_filled_groups": 0.0,
    }
    assert_aligned(batch)


def test_samples_again_until_the_batch_is_full():
    draw, calls = drawer(
        scored("a", [[1, 1], [0, 1], [0, 0]]),
        scored("b", [[0, 0], [0, 0], [1, 1]], width=5),
        scored("c", [[1, 0], [0, 0], [0, 1]], width=2),
    )
    batch, stats = sample_groups(draw, 3, G, enabled=True, max_extra_rounds=5)
    assert len(calls) == 3
    assert batch.rollout.texts == ["a1.0", "a1.1", "c0.0", "c0.1", "c2.0", "c2.1"]
    assert stats["sampling_dropped_groups"] == 2 + 3 + 1
    assert batch.generate_s == 3.0  # every round's generation time, for the logs
    assert batch.rollout.completion_ids.shape == (6, 3)  # padded to the widest kept row
    assert_aligned(batch)


def test_stops_at_its_cap_and_tops_up_with_dropped_groups():
    draw, calls = drawer(*(scored(t, [[1, 1], [0, 0]]) for t in "abc"), scored("d", [[0, 1]] * 2))
    batch, stats = sample_groups(draw, 3, G, enabled=True, max_extra_rounds=2)
    assert len(calls) == 3  # the fourth batch, with spread, is never drawn
    assert batch.rollout.texts == ["a0.0", "a0.1", "a1.0", "a1.1", "b0.0", "b0.1"]
    assert stats == {
        "sampling_rounds": 3.0,
        "sampling_dropped_groups": 3.0,
        "sampling_filled_groups": 3.0,
    }
    assert_aligned(batch)


def test_disabled_is_one_draw_as_is():
    original = scored("a", [[1, 1], [0, 0]])
    draw, calls = drawer(original, scored("b", [[0, 1], [0, 1]]))
    batch, stats = sample_groups(draw, 2, G)
    assert batch is original and len(calls) == 1 and stats == {}


@pytest.fixture(scope="module")
def tiny():
    return tiny_policy()


def real_batch(policy, questions: list[str], max_new_tokens: int) -> ScoredRollout:
    """G completions of each question from the rollout source, scored."""
    settings = SamplingSettings(max_new_tokens, max_prompt_length=256)
    backend = LeanBackend(policy, settings)
    source = RolloutSource(tiny_task(), policy, backend, CorrectnessReward())
    return source([{"question": q, "answer": "#### 7"} for q in questions], G, settings)


def test_concat_keeps_every_rows_log_probs(tiny):
    # Batches of different prompt and completion widths: after concatenation (prompts padded on
    # the left, completions on the right) the model gives every real token the same log-prob.
    short = real_batch(tiny, ["Ava has 3 apples."], max_new_tokens=3)
    long = real_batch(tiny, ["Ben buys 2 bags with 5 pens in each bag. How many pens?"], 7)
    both = concat([short, long])
    logp, _ = token_logprobs(tiny.model, both.rollout)
    for rows, part in ((slice(0, G), short), (slice(G, 2 * G), long)):
        alone, _ = token_logprobs(tiny.model, part.rollout)
        mask = part.rollout.completion_mask.bool()
        width = mask.shape[1]
        assert torch.equal(both.rollout.completion_mask[rows, :width].bool(), mask)
        torch.testing.assert_close(logp[rows, :width][mask], alone[mask], rtol=1e-4, atol=1e-5)
    assert both.rollout.texts == short.rollout.texts + long.rollout.texts


def test_real_generation_without_spread_stops_at_the_cap(tiny):
    # The untrained tiny model never answers right: every group scores 0, nothing has spread.
    draws = []

    def draw() -> ScoredRollout:
        draws.append(1)
        return real_batch(tiny, ["Ava has 3 apples and gets 4 more.", "Cleo has 7 pens."], 4)

    batch, stats = sample_groups(draw, 2, G, True, 1)
    assert len(draws) == 2 and stats["sampling_filled_groups"] == 2.0
    assert batch.rollout.completion_ids.shape[0] == 2 * G
