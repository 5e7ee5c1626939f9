"""Physical floors of a GRPO step's phases: the least time this machine's hardware allows each.

Used by scripts/bench.py, which prints each floor beside the measured phase. Plain arithmetic on
a model's shape, one step's token counts and two measured machine numbers (the fp32 matmul
ceiling F, FLOP/s, and the triad memory bandwidth W, bytes/s); no torch, no grpo. Each floor is
the physical minimum of the step's work, not of how any trainer does it: a group's shared prompt
is computed once, the last sampled token is never fed back, the LM head runs only where a
log-prob or the next token is needed, and a finished completion stops costing anything.
docs/performance.md ("Physical floors per phase") derives each formula; in short, with
N = B + H (B: parameters of the layers, H: of the LM head), L layers, h query heads, k key/value
heads of size d, P a prompt's tokens, c a completion's tokens, and A(s, e) = 4 L h d
(sum of i for i = s+1..e) the attention products of query positions s+1..e over their prefix:

- generation: prefill 2 B P + 2 H + A(0, P) FLOPs per distinct prompt; then for each decode step
  s = 1 .. max(c) - 1, over the rows still decoding (c > s), max(FLOPs / F, bytes / W) with
  FLOPs = 2 N per row + 4 L h d (P + s) per row and bytes = 4 N (every weight once per step,
  for the whole batch) + 8 L k d (P + s) per row (its key/value cache, fp32).
- scoring + reference: per forward pass, 2 B per fed token (each prompt once per group, c - 1
  completion tokens per row) + 2 H per scored token (c per row) + attention, over F.
- update: full fine-tuning 3 x (linear + attention FLOPs of one forward) (forward, input
  gradients, weight gradients); LoRA 2 x linear + 3 x attention + 6 a per fed token (a: adapter
  parameters; the frozen weights get no weight gradient); over F; plus AdamW's 28 bytes per
  trainable fp32 parameter (reads parameter, gradient and two moments, writes parameter and
  moments) over W.
- weight sync: read the policy's fp32 weights and write the engine's copy, 8 bytes per
  parameter handed over, over W.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4  # bytes per parameter, activation or cache entry
ADAMW_BYTES = 7 * FP32  # read parameter, gradient, 2 moments; write parameter, 2 moments


@dataclass(frozen=True)
class Machine:
    """The two measured limits every floor divides by."""

    flops: float  # FLOP/s: the fp32 matmul ceiling (bench: 4096^3 products, best of 3)
    bandwidth: float  # bytes/s: memory bandwidth (bench: a STREAM triad, best of 3)

    def seconds(self, flops: float, nbytes: float) -> float:
        """The least time for work of `flops` FLOPs that moves `nbytes` bytes: the larger bound."""
        return max(flops / self.flops, nbytes / self.bandwidth)


@dataclass(frozen=True)
class Model:
    """What the floors need of a causal LM held in fp32."""

    body: int  # B: parameters of the layers (all but the embedding table and the LM head)
    head: int  # H: LM head parameters (vocabulary x hidden; a tied embedding counted here)
    layers: int  # L: transformer blocks
    heads: int  # h: query heads
    kv_heads: int  # k: key/value heads (grouped-query attention: fewer than h)
    head_dim: int  # d: size of one head
    trainable: int  # parameters the optimiser updates (all of them, or the adapters')
    adapter: int = 0  # a: LoRA adapter parameters (0: full fine-tuning)
    synced: int = 0  # parameters handed to a rollout engine per weight sync (0: no engine)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights one token's pass reads (the embedding: one row, left out)."""
        return FP32 * (self.body + self.head)

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values cached per token position, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * FP32

    def attention_flops(self, start: int, end: int) -> int:
        """A(start, end): the score and value products of query positions start+1..end, each
        over every key up to its own position (2 products x 2 FLOPs x h d per key, per layer)."""
        keys = (end * (end + 1) - start * (start + 1)) // 2
        return 4 * self.layers * self.heads * self.head_dim * keys


@dataclass(frozen=True)
class Step:
    """One step's token counts: the distinct prompts and their completions."""

    prompts: tuple[int, ...]  # P of each distinct prompt
    completions: tuple[int, ...]  # c of each completion, G per prompt, grouped by prompt

    @property
    def fed(self) -> int:
        """Tokens a scoring pass feeds: each prompt once, all but the last of each completion."""
        return sum(self.prompts) + sum(c - 1 for c in self.completions)

    def rows(self) -> list[tuple[int, int]]:
        """(P, c) of every completion."""
        group = len(self.completions) // len(self.prompts)
        return [(self.prompts[i // group], c) for i, c in enumerate(self.completions)]


def forward_flops(model: Model, step: Step) -> tuple[int, int]:
    """(linear, attention) FLOPs of one pass that scores every completion token: each prompt
    fed once, c - 1 completion tokens fed per row, the LM head at the c scored positions."""
    linear = 2 * model.body * step.fed + 2 * model.head * sum(step.completions)
    attention = sum(model.attention_flops(0, p) for p in step.prompts)
    attention += sum(model.attention_flops(p, p + c - 1) for p, c in step.rows())
    return linear, attention


def generation(model: Model, step: Step, machine: Machine) -> float:
    """Seconds: the prefill of the distinct prompts, then every decode step of the rows still
    decoding (the first token comes from the prefill's logits)."""
    prefill = sum(
        2 * model.body * p + 2 * model.head + model.attention_flops(0, p) for p in step.prompts
    )
    seconds = machine.seconds(prefill, model.weight_bytes)
    for s in range(1, max(step.completions)):
        contexts = [p + s for p, c in step.rows() if c > s]  # keys each active row attends to
        flops = 2 * (model.body + model.head) * len(contexts)
        flops += sum(model.attention_flops(n - 1, n) for n in contexts)
        nbytes = model.weight_bytes + model.kv_bytes * sum(contexts)
        seconds += machine.seconds(flops, nbytes)
    return seconds


def scoring(model: Model, step: Step, machine: Machine, forwards: int = 1) -> float:
    """Seconds: `forwards` no-gradient passes (the reference; the old policy when computed)."""
    return forwards * machine.seconds(sum(forward_flops(model, step)), model.weight_bytes)


def update(model: Model, step: Step, machine: Machine) -> float:
    """Seconds: the policy's forward and backward passes, then AdamW's pass over its state."""
    linear, attention = forward_flops(model, step)
    if model.adapter:  # frozen weights: input gradients only; the adapters' own 3 products
        flops = 2 * linear + 3 * attention + 6 * model.adapter * step.fed
    else:
        flops = 3 * (linear + attention)
    optimiser = ADAMW_BYTES * model.trainable / machine.bandwidth
    return machine.seconds(flops, model.weight_bytes) + optimiser


def sync(model: Model, machine: Machine) -> float:
    """Seconds: the handed-over weights read from the policy and written into the engine."""
    return 2 * FP32 * model.synced / machine.bandwidth


def phase_floors(model: Model, step: Step, machine: Machine, forwards: int = 1) -> dict[str, float]:
    """Every phase's floor in seconds, keyed as the bench's split: generate, score_ref, update,
    sync (0 without a rollout engine), and step, their sum."""
    phases = {
        "generate": generation(model, step, machine),
        "score_ref": scoring(model, step, machine, forwards),
        "update": update(model, step, machine),
        "sync": sync(model, machine),
    }
    return {**phases, "step": sum(phases.values())}
