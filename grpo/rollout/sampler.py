"""The grouped sampler: batches of prompts, each repeated G times contiguously.

GRPO's baseline is the mean reward of the G completions of one prompt, so rows of one prompt
must stay together: rows `g*G .. g*G+G-1` belong to group `g`. With data parallelism
(`grpo.distributed`) every rank draws the same global batch and keeps its consecutive share of
whole groups, so a group is never split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupBatch:
    """One training batch: `prompt_indices[i]` is the dataset row of completion row i."""

    prompt_indices: list[int]
    group_ids: list[int]


class GroupedSampler:
    """Yields `batch_size` prompts per batch, each repeated `group_size` (G) times.

    `batch_size` is global: with `world_size` ranks, rank `rank` gets prompts
    `rank * batch_size / world_size ...` of each batch (`local_batch_size` of them).

    Prompts are visited in a seeded random order per epoch (a new permutation each epoch,
    from `seed` and the epoch number); a batch that runs past the end of an epoch continues
    into the next one. `state_dict()` / `load_state_dict()` restore the exact position.
    """

    def __init__(
        self,
        num_prompts: int,
        batch_size: int,
        group_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_prompts < 1:
            raise ValueError("the training split is empty")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.group_size = group_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.local_batch_size = batch_size // world_size  # prompts of each batch on this rank
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def next_prompts(self) -> list[int]:
        """The next `batch_size` prompt indices, advancing the position (and epoch)."""
        prompts: list[int] = []
        while len(prompts) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.batch_size - len(prompts)]
            prompts += take
            self.position += len(take)
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return prompts

    def expand(self, prompts: list[int]) -> GroupBatch:
        """Repeat each prompt G times contiguously, with its group id."""
        g = self.group_size
        return GroupBatch(
            prompt_indices=[p for p in prompts for _ in range(g)],
            group_ids=[i for i in range(len(prompts)) for _ in range(g)],
        )

    def __iter__(self) -> GroupedSampler:
        return self

    def __next__(self) -> GroupBatch:
        """This rank's share of the next global batch (all of it in a single process)."""
        start = self.rank * self.local_batch_size
        return self.expand(self.next_prompts()[start : start + self.local_batch_size])

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue exactly where this sampler is."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler seed differs: checkpoint {state['seed']}, now {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
