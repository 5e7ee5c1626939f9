"""The step's batch of groups, with DAPO's dynamic sampling (arXiv 2503.14476, section 3.2).

A group whose G rewards all agree has zero advantages: it adds no policy-gradient signal and, as
accuracy rises, more and more of the batch is such groups. DAPO drops them and samples more
prompts until the batch holds `num_groups` groups with reward spread. Here every extra round
samples a full batch of prompts, at most `max_extra_rounds` times; surplus groups with spread are
discarded. If the cap is reached first, the batch is topped up with dropped groups (zero
advantages, as plain GRPO would train on them), so its size never changes.

With several processes every round is collective: each rank generates its share of the round's
prompts, the shares are gathered (`grpo.distributed.gather_batch`), and every rank makes
the same choice on the whole round, so the ranks draw the same prompts in the same rounds as
one process would. The result is the global batch; each rank then trains on its part.
"""

from __future__ import annotations

from collections.abc import Callable

from grpo import distributed
from grpo.algorithm.advantages import group_reward_spread
from grpo.batch import ScoredRollout, concat, take


def _groups(batch: ScoredRollout, groups: list[int], group_size: int) -> ScoredRollout:
    """The rows of `groups` (group indices), in that order."""
    return take(batch, [k * group_size + j for k in groups for j in range(group_size)])


def sample_groups(
    draw: Callable[[], ScoredRollout],
    num_groups: int,
    group_size: int,
    enabled: bool = False,
    max_extra_rounds: int = 0,
) -> tuple[ScoredRollout, dict[str, float]]:
    """The global batch of `num_groups` groups; `draw()` generates and scores this rank's share
    of the next prompts (all of them in one process).

    Disabled: a single draw, as is. Enabled: keep the groups with reward spread from up to
    1 + max_extra_rounds draws, stopping once `num_groups` are kept; top up from the dropped
    groups if still short. Returns the batch and `sampling_rounds`, `sampling_dropped_groups`
    (groups without spread left out) and `sampling_filled_groups` (groups without spread put
    back because the cap was reached).
    """
    if not enabled:
        return distributed.gather_batch(draw()), {}
    kept: list[ScoredRollout] = []
    dropped: list[ScoredRollout] = []
    num_kept = num_dropped = rounds = 0
    generate_s = reward_s = 0.0
    while num_kept < num_groups and rounds <= max_extra_rounds:
        batch = distributed.gather_batch(draw())  # the same round on every rank
        rounds += 1
        generate_s += batch.generate_s
        reward_s += batch.reward_s
        has_spread = group_reward_spread(batch.rewards, group_size) > 0
        informative = has_spread.nonzero().flatten().tolist()[: num_groups - num_kept]
        flat = (~has_spread).nonzero().flatten().tolist()
        kept += [_groups(batch, informative, group_size)] if informative else []
        dropped += [_groups(batch, flat, group_size)] if flat else []
        num_kept += len(informative)
        num_dropped += len(flat)
    filled = num_groups - num_kept
    if filled > 0:
        kept.append(_groups(concat(dropped), list(range(filled)), group_size))
    result = concat(kept)
    result.generate_s, result.reward_s = generate_s, reward_s  # the dropped groups' time too
    stats = {
        "sampling_rounds": float(rounds),
        "sampling_dropped_groups": float(num_dropped - filled),
        "sampling_filled_groups": float(filled),
    }
    return result, stats
