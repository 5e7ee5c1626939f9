"""GRPO on a toy batch, one step at a time: `python scripts/example_grpo.py` (CPU, instant).

Two prompts, G = 4 sampled completions each, made-up rewards and made-up per-token
log-probabilities. Prints how rows group by prompt, the advantages of every registered
estimator, each term of the GRPO loss (DeepSeekMath eq. 3/4), every KL estimator, then the loss
under every policy loss and aggregation.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from grpo.algorithm.advantages import (  # noqa: E402
    ADVANTAGE_ESTIMATORS,
    estimate_advantages,
    group_reward_spread,
)
from grpo.algorithm.kl import KL_ESTIMATORS  # noqa: E402
from grpo.algorithm.loss import AGGREGATIONS, GRPOLoss  # noqa: E402
from grpo.algorithm.policy_losses import POLICY_LOSSES  # noqa: E402

PROMPTS = ["What is 2 + 3?", "What is 7 * 6?"]
GROUP_SIZE = 4
MAX_COMPLETION_LENGTH = 5
CLIP_RATIO = 0.2
KL_COEF = 0.04


def show_tokens(label: str, values: Tensor, mask: Tensor) -> None:
    """Print one line per completion with its valid tokens only (padding left out)."""
    print(label)
    for row, (row_values, row_mask) in enumerate(zip(values, mask, strict=True)):
        cells = "  ".join(f"{v:6.3f}" for v in row_values[row_mask].tolist())
        print(f"  row {row}: {cells}")
    print()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 1.0, 0.0, 0.0])
    lengths = torch.tensor([3, 5, 1, 4, 2, 5, 3, 4])
    mask = torch.arange(MAX_COMPLETION_LENGTH) < lengths.unsqueeze(1)
    shape = (len(rewards), MAX_COMPLETION_LENGTH)
    logprobs = -2 * torch.rand(shape, generator=gen)  # current policy pi_theta
    old_logprobs = logprobs + 0.3 * torch.randn(shape, generator=gen)  # policy that sampled
    ref_logprobs = logprobs + 0.2 * torch.randn(shape, generator=gen)  # frozen reference

    print("== Rows: contiguous groups of G completions of the same prompt ==")
    for row, (reward, length) in enumerate(zip(rewards.tolist(), lengths.tolist(), strict=True)):
        group = row // GROUP_SIZE
        print(f"  row {row}: prompt {group} {PROMPTS[group]!r:18} {reward=:.1f} {length} token(s)")
    spread = group_reward_spread(rewards, GROUP_SIZE)
    print(f"  reward std per group: {[round(s, 3) for s in spread.tolist()]}")
    print(f"  fraction of groups with zero spread (no signal): {(spread == 0).float().mean():.2f}")
    print()

    print("== Advantages: one number per completion, shared by all of its tokens ==")
    parts = {"correctness": rewards}
    for name in ADVANTAGE_ESTIMATORS:
        advantages = estimate_advantages({"name": name}, rewards, GROUP_SIZE, parts)
        print(f"  {name:22}: {[round(a, 3) for a in advantages.tolist()]}")
    print("  (grpo: (r - group mean) / group std, DeepSeekMath; no_std: r - group mean, Dr. GRPO)")
    print()
    advantages = estimate_advantages({"name": "grpo"}, rewards, GROUP_SIZE)

    print("== Loss terms per token (valid tokens only) ==")
    ratio = torch.exp(logprobs - old_logprobs)
    show_tokens("ratio r = pi_theta / pi_old = exp(logp - old_logp):", ratio, mask)
    clip = POLICY_LOSSES["clip"](
        logprobs, old_logprobs, advantages.unsqueeze(1), mask, clip_ratio=CLIP_RATIO
    )
    show_tokens(
        f"clipped surrogate min(r A, clip(r, {1 - CLIP_RATIO}, {1 + CLIP_RATIO}) A):",
        -clip.loss,
        mask,
    )
    binding = clip.clipped["clip_low"] | clip.clipped["clip_high"]
    show_tokens("clip binds (1 = the clipped term won, no gradient):", binding.float(), mask)
    for name in KL_ESTIMATORS:
        kl = KL_ESTIMATORS[name](logprobs, ref_logprobs, old_logprobs)
        show_tokens(f"KL to reference, estimator {name}:", kl, mask)
    kl = KL_ESTIMATORS["k3"](logprobs, ref_logprobs, old_logprobs)
    show_tokens(f"per-token loss -(surrogate - {KL_COEF} * k3):", clip.loss + KL_COEF * kl, mask)

    print("== Aggregated loss (what the optimizer minimises) ==")
    for policy_loss in POLICY_LOSSES:
        for aggregation in AGGREGATIONS:
            loss_fn = GRPOLoss(
                policy_loss={"name": policy_loss},
                kl={"coef": KL_COEF},
                aggregation=aggregation,
                max_completion_length=MAX_COMPLETION_LENGTH,
            )
            loss, _ = loss_fn(logprobs, old_logprobs, ref_logprobs, advantages, mask)
            print(f"  {policy_loss:12} {aggregation:24} loss {loss.item():+.4f}")
    print("  seq_mean_token_mean: mean over each completion's tokens, then over completions")
    print("  token_mean: every token of the batch weighs the same (DAPO)")
    print(f"  seq_mean_token_sum_norm: token sums / {MAX_COMPLETION_LENGTH}, then mean (Dr. GRPO)")
    print()
    print("== Statistics logged by the trainer (default: seq_mean_token_mean) ==")
    loss_fn = GRPOLoss(kl={"coef": KL_COEF})
    _, stats = loss_fn(logprobs, old_logprobs, ref_logprobs, advantages, mask)
    for name, value in stats.items():
        print(f"  {name:16} {value:+.4f}")


if __name__ == "__main__":
    main()
