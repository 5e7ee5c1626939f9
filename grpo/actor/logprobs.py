"""Log-probs of a rollout's completion tokens under a model: the forward passes of an update.

`token_logprobs` scores a batch of (prompt, completion) rows with one forward pass. For
Llama/Qwen2/Qwen3 the LM head runs only at sampled tokens, in chunks recomputed in backward
(`_ChunkedLogProbs`), so the (rows, length, vocabulary) logits never exist.

`SharedPrompts` scores a batch the way GRPO's batches are made: the G completions of a group
share their prompt, so each distinct prompt goes through the model once and every completion's
forward pass reads its keys/values (KV cache) instead of recomputing them. The prompt is often
more than half of a row's tokens. Exact: the same sums in another order. With gradients on, the
prompt's outputs are cut from the graph into leaf tensors; each completion micro-batch's
backward adds into their gradients, and `SharedPrompts.backward` sends the total back through
the prompt's forward pass once, so a micro-batch's memory is its completions plus its prompts.

`micro_batches` plans a batch into chunks of whole groups (one prompt pass each) and
micro-batches of at most `micro_batch_size` completions within them, or of at most a token
budget; a budget's micro-batches are `Packed`: short completions of one prompt run back to back
in one sequence (a bin), each attending to its prompt and to its own earlier tokens only, so a
micro-batch's padding is what its bins leave, not what its rows leave. `batch_logprobs` is the
no-gradient pass over a whole rollout (reference and old policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from grpo import distributed
from grpo.batch import Rollout, take
from grpo.model.loading import LLAMA_LIKE, causal_lm

Rows = slice | list[int]  # rows of a batch: a slice, or row indices
# Words of the vocabulary per LM-head product on the CPU (`_head_logits`, the head's weight
# gradient). MKL's sgemm takes 1.6-1.8x longer for SmolLM2's 128 rows x 49152 words in one
# product than in chunks of 2048, whose outputs stay in cache, and gives the same bits: a logit's
# sum over the hidden size does not depend on how many words share its product
# (docs/performance.md, change 24).
HEAD_WORDS = 2048


@dataclass(frozen=True)
class Packed:
    """A token-budget micro-batch (`micro_batches`): bins of rows (indices in the batch) of one
    prompt each, whose completions run back to back in one sequence; a bin of one row is a
    plain row."""

    bins: tuple[tuple[int, ...], ...]

    @property
    def rows(self) -> list[int]:
        """The rows in the order `SharedPrompts.logprobs` returns their log-probs."""
        return [row for b in self.bins for row in b]


MicroBatch = slice | Packed  # a fixed-size micro-batch, or a token budget's


def rows_of(micro: MicroBatch) -> Rows:
    """The batch rows of a micro-batch, in the order its log-probs come."""
    return micro.rows if isinstance(micro, Packed) else micro


def token_logprobs(
    model: PreTrainedModel,
    rollout: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_logits: int | None = 2**24,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N, T) of the completion tokens under `model`, at the sampling temperature.

    Columns that are padding in every row (left of the longest prompt, right of the longest
    completion) are cut before the forward pass. For Llama/Qwen2/Qwen3 models the LM head then
    runs only at sampled tokens, in chunks of at most `chunk_logits` logits (tokens x
    vocabulary; 0 = one chunk) recomputed in backward, so no (N, T, V) tensor is ever held.
    `chunk_logits=None`, and other models, compute all completion positions' logits at once
    (`logits_to_keep`). Padding positions, and the environment's tokens of a multi-turn
    trajectory (`Rollout.model_mask`: context, never scored), get log-prob 0. Entropy (N, T),
    when asked, is computed without gradient, for logging, unless `entropy_grad` (an entropy
    bonus in the loss needs its gradient).
    """
    start = int(rollout.prompt_mask.any(0).long().argmax())
    prompt_ids, prompt_mask = rollout.prompt_ids[:, start:], rollout.prompt_mask[:, start:]
    ids, mask, scored = _trimmed_completions(rollout)
    if _chunked_head(model) and chunk_logits is not None:
        inputs = _model_inputs(prompt_ids, prompt_mask, ids, mask)
        # The model's own forward (hooks see it), for its final hidden states; no logits.
        out = model(
            **inputs, output_hidden_states=True, logits_to_keep=_no_logits(ids), use_cache=False
        )
        hidden = out.hidden_states[-1][:, -(ids.shape[1] + 1) : -1]
        scores = _head_logprobs(
            hidden, model, ids, scored, temperature, with_entropy, entropy_grad, chunk_logits
        )
    else:
        scores = _logprobs_from_logits(
            model,
            prompt_ids,
            prompt_mask,
            ids,
            mask,
            scored,
            temperature,
            with_entropy,
            entropy_grad,
        )
    return _padded(scores, rollout.completion_ids.shape[1])


def can_share_prompts(model: PreTrainedModel) -> bool:
    """True when `SharedPrompts` can run `model`: Llama/Qwen with the chunked head, a KV cache
    in its forward pass (gradient checkpointing turns the cache off in training), and not
    FSDP-sharded (its ranks must run the same forward and backward passes, untested here)."""
    checkpointing = model.training and causal_lm(model).is_gradient_checkpointing
    return _chunked_head(model) and not checkpointing and not distributed.sharded(model)


def can_pack(model: PreTrainedModel) -> bool:
    """True when `SharedPrompts` can run `Packed` bins of several rows: prompts shared, and
    PyTorch's attention (SDPA), which takes the bins' block mask as a boolean tensor."""
    config = causal_lm(model).config
    return can_share_prompts(model) and config._attn_implementation == "sdpa"


class SharedPrompts:
    """Completion log-probs of `rollout`'s rows with each distinct prompt run once (module doc).

    Rows with the same prompt as the row before share it (a group's G rows). Construction runs
    the prompts of `rollout`'s rows `rows` (a chunk of `micro_batches`); `logprobs(rows)` scores
    some of those rows (indices in `rollout`); `backward()`, after the micro-batches'
    own backward passes, sends their gradients through the prompts' forward pass. With
    `share=False` (or a model `can_share_prompts` refuses) each call is a plain `token_logprobs`
    and `backward` does nothing.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        rollout: Rollout,
        rows: slice = slice(None),
        temperature: float = 1.0,
        share: bool = True,
        chunk_logits: int = 2**24,
    ) -> None:
        self.model, self.temperature = model, temperature
        self.rollout, self.offset = take(rollout, rows), rows.start or 0
        self.chunk_logits = chunk_logits
        self.share = share and can_share_prompts(model)
        self._graph: list[torch.Tensor] = []  # the prompt pass's outputs, with their graph
        if self.share:
            self._run_prompts()

    def _run_prompts(self) -> None:
        first = _new_prompt(self.rollout)
        self.prompt_of_row = first.long().cumsum(0) - 1
        ids, mask = self.rollout.prompt_ids[first], self.rollout.prompt_mask[first]
        start = int(mask.any(0).long().argmax())  # drop columns that are padding in every row
        self.prompt_mask = mask[:, start:]
        self.prompt_length = self.prompt_mask.sum(1)
        self._config = causal_lm(self.model).config  # of the completions' caches
        out = self.model(
            input_ids=ids[:, start:],
            attention_mask=self.prompt_mask,
            position_ids=(self.prompt_mask.cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=_no_logits(ids),
        )
        # The last prompt position's hidden state predicts the first completion token.
        outputs = [out.hidden_states[-1][:, -1]]
        outputs += [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        if torch.is_grad_enabled():
            self._graph = outputs
            outputs = [t.detach().requires_grad_() for t in outputs]
        self._outputs = outputs

    def logprobs(
        self, rows: Rows | Packed, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`token_logprobs` of rollout rows `rows`, reading their prompts' keys/values; for
        `Packed` rows, of `rows.rows`, each bin's completions in one sequence."""
        if isinstance(rows, Packed):
            if max(map(len, rows.bins)) > 1:
                return self._packed_logprobs(rows, with_entropy, entropy_grad)
            rows = rows.rows
        if isinstance(rows, slice):
            rows = slice(rows.start - self.offset, rows.stop - self.offset)
        else:
            rows = [r - self.offset for r in rows]
        micro = take(self.rollout, rows)
        if not self.share:
            return token_logprobs(
                self.model,
                micro,
                self.temperature,
                with_entropy,
                entropy_grad,
                self.chunk_logits,
            )
        ids, mask, scored = _trimmed_completions(micro)
        prompt = self.prompt_of_row[rows if isinstance(rows, slice) else torch.tensor(rows)]
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = torch.cat([self.prompt_mask[prompt], mask], 1)
        out = self._after_prompts(ids, mask, self.prompt_length[prompt, None] + positions, prompt)
        last = self._outputs[0].index_select(0, prompt)
        hidden = torch.cat([last[:, None], out[:, :-1]], 1)
        return self._scores(hidden, micro, ids, scored, with_entropy, entropy_grad)

    def _after_prompts(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, prompt: torch.Tensor
    ) -> torch.Tensor:
        """The model's last hidden states at `ids`, each row after its cached prompt (`prompt`:
        indices of the chunk's prompts), under `mask` (2-D, or a 4-D boolean mask)."""
        kv = [x.index_select(0, prompt) for x in self._outputs[1:]]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(list(zip(kv[0::2], kv[1::2], strict=True)), self._config),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=_no_logits(ids),
        )
        return out.hidden_states[-1]

    def _scores(
        self,
        hidden: torch.Tensor,
        micro: Rollout,
        ids: torch.Tensor,
        scored: torch.Tensor,
        with_entropy: bool,
        entropy_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of `micro`'s trimmed completions `ids` at the tokens
        `scored`, from the hidden states before each, padded back to its width."""
        scores = _head_logprobs(
            hidden,
            self.model,
            ids,
            scored,
            self.temperature,
            with_entropy,
            entropy_grad,
            self.chunk_logits,
        )
        return _padded(scores, micro.completion_ids.shape[1])

    def _packed_logprobs(
        self, packed: Packed, with_entropy: bool, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logprobs` of packed rows: one sequence per bin, its rows' completions back to back.

        A token attends to its prompt (the bin's, from the cache) and to the earlier tokens of
        its own completion: a block-diagonal causal mask, positions restarting after the prompt
        for each completion, so each completion sees what it sees alone (the same sums up to
        float rounding, as the shared prompt pass). The hidden state before each token is then
        gathered back into the rows' layout for the LM head."""
        if not self.share:
            raise ValueError("packed micro-batches need the shared prompt pass (can_pack)")
        bins = [[r - self.offset for r in b] for b in packed.bins]
        rows = [r for b in bins for r in b]
        micro = take(self.rollout, rows)
        ids, _, scored = _trimmed_completions(micro)
        lengths = self.rollout.completion_mask.sum(1).tolist()
        width, device = max(sum(lengths[r] for r in b) for b in bins), ids.device
        shape = (len(bins), width)
        tokens = torch.full(shape, self.rollout.pad_token_id, dtype=ids.dtype, device=device)
        segment = torch.full(shape, -1, device=device)  # which of the bin's rows; -1: padding
        offset = torch.zeros(shape, dtype=torch.long, device=device)  # place in its completion
        starts = []  # each row's first token, as an index into the bins' flattened positions
        for i, b in enumerate(bins):
            at = 0
            for j, r in enumerate(b):
                n = lengths[r]
                tokens[i, at : at + n] = self.rollout.completion_ids[r, :n]
                segment[i, at : at + n] = j
                offset[i, at : at + n] = torch.arange(n, device=device)
                starts.append(i * width + at)
                at += n
        prompt = self.prompt_of_row[[b[0] for b in bins]]
        own = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
        own &= torch.ones(width, width, dtype=torch.bool, device=device).tril()
        context = self.prompt_mask[prompt].bool()[:, None, :].expand(-1, width, -1)
        mask = torch.cat([context, own], 2)[:, None]  # padding sees the prompt
        out = self._after_prompts(tokens, mask, self.prompt_length[prompt, None] + offset, prompt)
        # Row k's token t is predicted by the state before it: its prompt's last for t = 0, else
        # bin position starts[k] + t - 1; past the row's end any index will do (not scored).
        last = self._outputs[0].index_select(0, self.prompt_of_row[rows])
        flat = torch.cat([out.flatten(0, 1), last])
        t = torch.arange(ids.shape[1], device=device)
        before = torch.tensor(starts, device=device)[:, None] + t - 1
        first = len(bins) * width + torch.arange(len(rows), device=device)[:, None]
        ends = torch.tensor([lengths[r] for r in rows], device=device)[:, None]
        inside = (t > 0) & (t < ends)
        hidden = flat[torch.where(inside, before, first)]
        return self._scores(hidden, micro, ids, scored, with_entropy, entropy_grad)

    def backward(self) -> None:
        """Send the gradients the micro-batches left on the prompts' outputs through their pass."""
        if not self._graph:
            return
        outputs = zip(self._graph, self._outputs, strict=True)
        pairs = [(t, leaf.grad) for t, leaf in outputs if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self._graph = []


def micro_batches(
    rollout: Rollout, micro_batch_size: int, max_tokens: int | None = None, pack: bool = False
) -> list[tuple[slice, list[MicroBatch]]]:
    """The batch as chunks of whole groups, each with its micro-batches: (chunk rows,
    [micro-batch, ...]), rows counted in the batch. Each chunk's prompts run once for its
    micro-batches (`SharedPrompts`).

    Fixed size (`max_tokens` None): a chunk holds as many consecutive groups (rows sharing a
    prompt) as fit in one micro-batch, or one group when a group is larger, and its
    micro-batches are runs (slices) of at most `micro_batch_size` rows.

    Token budget (`max_tokens` N): a chunk holds consecutive groups of at most N tokens (prompt
    + completion, unpadded; at least one group). With `pack` (the model `can_pack`) each
    group's rows go into bins, first fit by decreasing length, no longer than the chunk's
    longest completion, so short completions share a sequence; without, a bin is a row. The
    bins, longest first, fill `Packed` micro-batches of at most N tokens once padded (bins x
    (the chunk's prompt width + the micro-batch's longest bin); at least one bin). The losses'
    normalisers are the mini-batch's either way, so the gradient is the same.
    """
    if max_tokens is not None:
        return _token_budget_plan(rollout, max_tokens, pack)
    ends = [*(_new_prompt(rollout).nonzero()[1:, 0]).tolist(), len(rollout.prompt_ids)]
    plan, begin = [], 0
    for end, next_end in zip(ends, [*ends[1:], None], strict=True):
        if next_end is None or next_end - begin > micro_batch_size:
            rows = range(begin, end, micro_batch_size)
            micro: list[MicroBatch] = [slice(r, min(r + micro_batch_size, end)) for r in rows]
            plan.append((slice(begin, end), micro))
            begin = end
    return plan


def _token_budget_plan(
    rollout: Rollout, max_tokens: int, pack: bool
) -> list[tuple[slice, list[MicroBatch]]]:
    """`micro_batches` with a token budget (see there)."""
    prompt_len = rollout.prompt_mask.sum(1).tolist()
    completion_len = rollout.completion_mask.sum(1).tolist()
    starts = _new_prompt(rollout).nonzero()[:, 0].tolist()
    groups = list(zip(starts, [*starts[1:], len(prompt_len)], strict=True))
    chunks: list[list[tuple[int, int]]] = []
    tokens = 0
    for start, end in groups:
        size = sum(prompt_len[r] + completion_len[r] for r in range(start, end))
        if chunks and tokens + size <= max_tokens:
            chunks[-1].append((start, end))
            tokens += size
        else:
            chunks.append([(start, end)])
            tokens = size
    plan = []
    for chunk in chunks:
        begin, end = chunk[0][0], chunk[-1][1]
        width = max(prompt_len[begin:end])
        capacity = max(completion_len[begin:end]) if pack else 0
        bins = [
            b for start, stop in chunk for b in _bins(range(start, stop), completion_len, capacity)
        ]
        sized = sorted(((sum(completion_len[r] for r in b), b) for b in bins), key=lambda x: -x[0])
        micro: list[list[list[int]]] = []
        longest = 0  # the current micro-batch's first bin: the longest, bins come longest first
        for size, b in sized:
            if micro and (len(micro[-1]) + 1) * (width + longest) <= max_tokens:
                micro[-1].append(b)
            else:
                micro.append([b])
                longest = size
        plan.append((slice(begin, end), micro))
    _same_count_on_every_rank([micro for _, micro in plan])
    return [
        (chunk, [Packed(tuple(tuple(sorted(b)) for b in m)) for m in micro])
        for chunk, micro in plan
    ]


def _bins(rows: range, lengths: list[int], capacity: int) -> list[list[int]]:
    """`rows` in bins of at most `capacity` completion tokens, first fit by decreasing length
    (capacity 0: a bin per row)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -lengths[r]):
        fits = [i for i, free in enumerate(room) if lengths[row] <= free]
        if fits:
            bins[fits[0]].append(row)
            room[fits[0]] -= lengths[row]
        else:
            bins.append([row])
            room.append(capacity - lengths[row])
    return bins


def _same_count_on_every_rank(chunks: list[list[list[list[int]]]]) -> None:
    """Split micro-batches (in place) until this rank has as many as the rank with the most:
    FSDP's ranks must run the same forward passes, and token-budget plans can differ by rank.
    The micro-batch with the most rows is split in two each time (its bins in halves, or its
    one bin's rows); a rank has as many rows as any other, so it always can. One process:
    nothing to agree."""
    count = distributed.max_over_ranks(sum(len(micro) for micro in chunks))

    def size(bins: list[list[int]]) -> int:
        return sum(map(len, bins))

    while sum(len(micro) for micro in chunks) < count:
        micro = max(chunks, key=lambda c: max(map(size, c)))
        largest = max(micro, key=size)
        bins = largest if len(largest) > 1 else [[r] for r in largest[0]]
        index = micro.index(largest)
        micro[index : index + 1] = [bins[: len(bins) // 2], bins[len(bins) // 2 :]]


@torch.no_grad()
def batch_logprobs(
    model: PreTrainedModel,
    rollout: Rollout,
    temperature: float,
    batch_size: int,
    share_prompts: bool = True,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, T] log-probs (and entropies) of a whole rollout without gradient, `batch_size`
    completions a pass."""
    logps, entropies = [], []
    for chunk, rows in micro_batches(rollout, batch_size):
        prompts = SharedPrompts(model, rollout, chunk, temperature, share_prompts)
        for r in rows:
            logp, entropy = prompts.logprobs(r, with_entropy=with_entropy)
            logps.append(logp)
            entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def _new_prompt(rollout: Rollout) -> torch.Tensor:
    """(N,) bool: the row's prompt differs from the row before's (the first row: True)."""
    ids, mask = rollout.prompt_ids, rollout.prompt_mask
    new = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    new[1:] = (ids[1:] != ids[:-1]).any(1) | (mask[1:] != mask[:-1]).any(1)
    return new


def _trimmed_completions(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion ids, mask (the tokens the model reads) and the tokens to score (the model's:
    `Rollout.model_mask`) up to the last column any row uses (at least one column)."""
    used = rollout.completion_mask.any(0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    cut = slice(None, width)
    return (
        rollout.completion_ids[:, cut],
        rollout.completion_mask[:, cut],
        rollout.model_mask[:, cut],
    )


def _padded(
    scores: tuple[torch.Tensor, torch.Tensor | None], width: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies of trimmed completions, padded with 0 back to `width` columns."""
    logp, entropy = scores
    pad = (0, width - logp.shape[1])
    return F.pad(logp, pad), None if entropy is None else F.pad(entropy, pad)


def _chunked_head(model: PreTrainedModel) -> bool:
    """True for models whose LM head `_ChunkedLogProbs` can run (Llama/Qwen, a Linear whose
    weight is whole: an FSDP-sharded head runs inside the model's forward instead)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    return (
        lm.config.model_type in LLAMA_LIKE
        and isinstance(head, nn.Linear)
        and not distributed.sharded(head.weight)
    )


def _no_logits(like: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for a forward pass read for its hidden states only: no position, so the
    model's LM head multiplies nothing (1 would still cost a rows x vocabulary product: SmolLM2's
    update spent ~0.1 s a step on logits it never read)."""
    return torch.empty(0, dtype=torch.long, device=like.device)


def _model_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Prompt and completion as one left- and right-padded batch, with its position ids."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}


def _head_logprobs(
    hidden: torch.Tensor,
    model: PreTrainedModel,
    ids: torch.Tensor,
    scored: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    chunk_logits: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) (N, T) of tokens `ids` from the hidden states that predict
    them, through the model's chunked LM head at the positions of `scored` only (0 elsewhere)."""
    head = causal_lm(model).get_output_embeddings()
    valid = scored.bool()
    rows = max(1, chunk_logits // head.out_features) if chunk_logits else int(valid.sum())
    states, weight = hidden[valid], head.weight
    if getattr(head, "float32", False):  # grpo.model.loading.Float32Head: logits in float32
        states, weight = states.float(), weight.float()
    logp, entropy = _ChunkedLogProbs.apply(
        states, weight, ids[valid], temperature, with_entropy, rows
    )
    logp = hidden.new_zeros(valid.shape, dtype=torch.float32).masked_scatter(valid, logp)
    if not with_entropy:
        return logp, None
    if not (entropy_grad and torch.is_grad_enabled()):
        entropy = entropy.detach()
    return logp, hidden.new_zeros(valid.shape, dtype=torch.float32).masked_scatter(valid, entropy)


def _logprobs_from_logits(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    scored: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` for any model: the logits of the completion positions at once, the
    log-probs (and entropies) kept at the positions of `scored` (0 elsewhere)."""
    t = ids.shape[1]
    inputs = _model_inputs(prompt_ids, prompt_mask, ids, mask)
    logits = model(**inputs, logits_to_keep=t + 1, use_cache=False).logits
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    valid = scored.bool()
    logp = torch.where(valid, chosen - logits.logsumexp(-1), 0.0)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            p = logits.softmax(-1)
            entropy = torch.where(valid, -(p * torch.log_softmax(logits, -1)).sum(-1), 0.0)
    return logp, entropy


class _ChunkedLogProbs(torch.autograd.Function):
    """Log-probs (and entropies) of chosen tokens from final hidden states, chunk by chunk.

    Forward keeps the hidden states and each row's logsumexp; backward recomputes a chunk's
    log-probabilities log p = z - logsumexp(z) from its logits z and applies d logp / d z =
    (onehot - p) / temperature and d H / d z = -p (log p + H) / temperature. Two (chunk, V)
    buffers at a time, updated in place. When every row fits in one chunk and a gradient is
    needed, forward keeps that chunk's log p for backward instead (one buffer held from the
    head's forward to its backward, which comes first in the backward pass): the recomputed
    product was one of the update's four LM-head products (docs/performance.md, change 17).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, with_entropy, rows):
        n = ids.shape[0]
        logp, lse = (hidden.new_empty(n, dtype=torch.float32) for _ in range(2))
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        keep = n <= rows and any(ctx.needs_input_grad[:2])
        ctx.log_p = None
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            logits = _head_logits(hidden[part], weight, temperature)
            lse[part] = logits.logsumexp(-1)
            logp[part] = logits.gather(1, ids[part, None])[:, 0] - lse[part]
            if keep or with_entropy:
                log_p = logits - lse[part, None]
            if keep:
                ctx.log_p = log_p
            if with_entropy:  # H = lse - sum(p z)
                p = log_p.exp() if keep else log_p.exp_()
                entropy[part] = lse[part] - p.mul_(logits).sum(-1)
        ctx.save_for_backward(hidden, weight, ids, lse, entropy)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, ids, lse, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        n = ids.shape[0]
        g_logp = grad_logp if grad_logp is not None else lse.new_zeros(n)
        for start in range(0, n, ctx.rows):
            part = slice(start, start + ctx.rows)
            log_p, ctx.log_p = ctx.log_p, None
            if log_p is None:
                log_p = _head_logits(hidden[part], weight, ctx.temperature).sub_(lse[part, None])
            p = log_p.exp()
            # grad z = p * c + onehot * g_logp, with c = -g_logp - g_H (log p + H)
            coef = -g_logp[part, None]
            if grad_entropy is not None:
                coef = log_p.add_(entropy[part, None]).mul_(-grad_entropy[part, None]).add_(coef)
            grad = p.mul_(coef).scatter_add_(1, ids[part, None], g_logp[part, None])
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[part])
            if ctx.needs_input_grad[1]:
                first = grad_weight is None  # beta 0: the empty buffer is not read
                if first:
                    grad_weight = torch.empty_like(weight)
                for words in _vocabulary_chunks(weight):  # each word's row: the same sums
                    grad_weight[words].addmm_(grad[:, words].T, hidden[part], beta=int(not first))
        return grad_hidden, grad_weight, None, None, None, None


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 logits of the LM head, divided by the temperature: one product per chunk of
    `HEAD_WORDS` words (`_vocabulary_chunks`) into one buffer, each logit the same sum as in
    one product."""
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
    for words in _vocabulary_chunks(weight):
        torch.mm(hidden, weight[words].T, out=logits[:, words])
    logits = logits.float()  # a buffer of our own: divided in place
    return logits.div_(temperature) if temperature != 1.0 else logits


def _vocabulary_chunks(weight: torch.Tensor) -> list[slice]:
    """The LM head's rows (`weight`: vocabulary x hidden) in chunks of `HEAD_WORDS` words on
    the CPU (cache-sized outputs); elsewhere one chunk (a GPU runs one large product best)."""
    words = weight.shape[0]
    step = HEAD_WORDS if weight.device.type == "cpu" else words
    return [slice(start, start + step) for start in range(0, words, step)]
