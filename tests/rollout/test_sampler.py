"""The grouped sampler: G contiguous rows per prompt, seeded epochs, exact resume."""

from __future__ import annotations

import pytest

from grpo.rollout.sampler import GroupedSampler


def take(sampler: GroupedSampler, batches: int) -> list[list[int]]:
    return [next(sampler).prompt_indices for _ in range(batches)]


def test_each_prompt_fills_g_contiguous_rows_with_its_group_id():
    batch = next(GroupedSampler(num_prompts=10, batch_size=3, group_size=4, seed=0))
    assert len(batch.prompt_indices) == 12
    for group in range(3):
        rows = slice(group * 4, group * 4 + 4)
        assert len(set(batch.prompt_indices[rows])) == 1
        assert batch.group_ids[rows] == [group] * 4
    assert len(set(batch.prompt_indices[::4])) == 3  # three different prompts


def test_same_seed_same_order_other_seed_other_order():
    a = take(GroupedSampler(50, 4, 2, seed=7), 5)
    assert a == take(GroupedSampler(50, 4, 2, seed=7), 5)
    assert a != take(GroupedSampler(50, 4, 2, seed=8), 5)


def test_every_epoch_visits_each_prompt_once_in_a_new_order():
    sampler = GroupedSampler(num_prompts=12, batch_size=4, group_size=2, seed=1)
    epochs = [[p for b in take(sampler, 3) for p in b[::2]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]
    assert sampler.epoch == 2 and sampler.position == 0


def test_a_batch_crossing_the_epoch_end_continues_into_the_next_epoch():
    sampler = GroupedSampler(num_prompts=5, batch_size=3, group_size=2, seed=0)
    first, second = (b[::2] for b in take(sampler, 2))
    assert len(set(first + second[:2])) == 5  # the first epoch, whole
    assert sampler.epoch == 1 and sampler.position == 1


def test_unshuffled_order_is_the_data_order():
    sampler = GroupedSampler(num_prompts=4, batch_size=2, group_size=2, shuffle=False)
    assert [b[::2] for b in take(sampler, 3)] == [[0, 1], [2, 3], [0, 1]]


def test_state_dict_resumes_exactly_mid_epoch():
    sampler = GroupedSampler(num_prompts=7, batch_size=3, group_size=2, seed=3)
    take(sampler, 4)
    state = sampler.state_dict()
    expected = take(sampler, 6)
    resumed = GroupedSampler(num_prompts=7, batch_size=3, group_size=2, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected


def test_state_from_another_seed_is_refused():
    state = GroupedSampler(7, 3, 2, seed=3).state_dict()
    with pytest.raises(ValueError, match="sampler seed differs"):
        GroupedSampler(7, 3, 2, seed=4).load_state_dict(state)


def test_an_empty_training_split_is_refused():
    """The sizes are config rules (grpo.run.config); the split's size is known only here."""
    with pytest.raises(ValueError, match="the training split is empty"):
        GroupedSampler(num_prompts=0, batch_size=2, group_size=2)
