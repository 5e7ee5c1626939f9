"""GRPO on a toy batch, one step at a time: `python scripts/example_grpo.py` (CPU, instant).

Two prompts, G = 4 sampled completions each, made-up rewards and made-up per-token
log-probabilities. Prints how rows group by prompt, the group-relative advantages and each term
of the GRPO loss (DeepSeekMath eq. 3/4), then the loss under every aggregation.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from grpo.advantages import group_advantages, group_reward_spread  # noqa: E402
from grpo.loss import AGGREGATIONS, GRPOLoss, clipped_surrogate, kl_k3  # noqa: E402

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
    for scale in ("group", "none", "batch"):
        advantages = group_advantages(rewards, GROUP_SIZE, scale=scale)
        print(f"  scale={scale:5}: {[round(a, 3) for a in advantages.tolist()]}")
    print("  (group: (r - group mean) / group std, DeepSeekMath; none: r - group mean, Dr. GRPO)")
    print()
    advantages = group_advantages(rewards, GROUP_SIZE)

    print("== Loss terms per token (valid tokens only) ==")
    ratio = torch.exp(logprobs - old_logprobs)
    show_tokens("ratio r = pi_theta / pi_old = exp(logp - old_logp):", ratio, mask)
    surrogate, clipped, _ = clipped_surrogate(
        ratio, advantages.unsqueeze(1), CLIP_RATIO, CLIP_RATIO
    )
    show_tokens(
        f"clipped surrogate min(r A, clip(r, {1 - CLIP_RATIO}, {1 + CLIP_RATIO}) A):",
        surrogate,
        mask,
    )
    show_tokens("clip active (1 = the clipped term won, no gradient):", clipped.float(), mask)
    kl = kl_k3(logprobs, ref_logprobs)
    show_tokens("KL to reference, k3 = exp(ref - logp) - (ref - logp) - 1 (always >= 0):", kl, mask)
    show_tokens(f"per-token loss -(surrogate - {KL_COEF} * KL):", -(surrogate - KL_COEF * kl), mask)

    print("== Aggregated loss (what the optimizer minimises) ==")
    for aggregation in AGGREGATIONS:
        loss_fn = GRPOLoss(
            clip_ratio=CLIP_RATIO,
            kl_coef=KL_COEF,
            aggregation=aggregation,
            max_completion_length=MAX_COMPLETION_LENGTH,
        )
        loss, _ = loss_fn(logprobs, old_logprobs, ref_logprobs, advantages, mask)
        print(f"  {aggregation:24} loss {loss.item():+.4f}")
    print("  seq_mean_token_mean: mean over each completion's tokens, then over completions")
    print("  token_mean: every token of the batch weighs the same (DAPO)")
    print(f"  seq_mean_token_sum_norm: token sums / {MAX_COMPLETION_LENGTH}, then mean (Dr. GRPO)")
    print()
    print("== Statistics logged by the trainer (default: seq_mean_token_mean) ==")
    loss_fn = GRPOLoss(clip_ratio=CLIP_RATIO, kl_coef=KL_COEF)
    _, stats = loss_fn(logprobs, old_logprobs, ref_logprobs, advantages, mask)
    for name, value in stats.items():
        print(f"  {name:16} {value:+.4f}")


if __name__ == "__main__":
    main()
