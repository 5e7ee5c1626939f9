"""The batch types: a trajectory's loss mask is indexed and joined like the other token masks."""

import torch

from grpo.batch import Rollout, concat, take


def trajectory_batch(width: int, loss_mask: list[list[int]] | None) -> Rollout:
    """Two rows of `width` completion tokens, all valid, with `loss_mask`."""
    return Rollout(
        prompt_ids=torch.ones(2, 3, dtype=torch.long),
        prompt_mask=torch.ones(2, 3, dtype=torch.long),
        completion_ids=torch.full((2, width), 5),
        completion_mask=torch.ones(2, width, dtype=torch.long),
        truncated=torch.zeros(2, dtype=torch.bool),
        texts=["a", "b"],
        pad_token_id=0,
        loss_mask=None if loss_mask is None else torch.tensor(loss_mask),
    )


def test_the_loss_mask_is_taken_and_joined_with_padding_outside_it():
    short = trajectory_batch(2, [[1, 0], [0, 1]])
    wide = trajectory_batch(3, [[1, 0, 1], [1, 1, 0]])
    both = concat([short, wide])
    assert both.loss_mask.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1], [1, 1, 0]]
    assert both.model_mask.tolist() == both.loss_mask.tolist()
    assert both.lengths.tolist() == [2, 2, 3, 3]  # the whole trajectory
    assert take(both, [3, 0]).loss_mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert take(both, slice(1, 2)).model_mask.tolist() == [[0, 1, 0]]


def test_without_a_loss_mask_the_model_mask_is_the_completion_mask():
    one_turn = trajectory_batch(2, None)
    assert one_turn.model_mask is one_turn.completion_mask
    assert take(concat([one_turn, one_turn]), [1]).loss_mask is None
