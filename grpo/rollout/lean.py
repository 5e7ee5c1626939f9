"""A lean sampling loop for Llama-family models: `generate`'s work, little of its overhead.

transformers' `generate` rebuilds the attention mask, position ids, rotary tables and cache
bookkeeping on every token, and runs a pipeline of logits processors and stopping criteria;
for a small model on CPU that Python work is most of a decoding step. `sample` runs the prompt
through the model's own forward once (prefill), then decodes with the model's own modules
(norms, projections, MLP, LM head; LoRA and 4-bit layers included) in a short loop: key/value
buffers allocated once, rotary tables computed once, one boolean mask updated in place. LoRA
adapters are merged into their layer's weight for the call (W + B A scaling, a transient copy):
one product per token instead of three; big models' weights go through a product made for
streaming them and small models' projections are stacked, when sampling
(`grpo.rollout.products`); sampling on the CPU also runs the operations between products fused
(attention with rotary embedding and the cache write, each residual add with its RMSNorm,
SwiGLU: `decode_ops.cpp`, `fused_ops`), which round differently in the last bits.

Each operation mirrors transformers' sdpa code path, so greedy decoding returns the same tokens
as `generate`, bit for bit (with trained LoRA adapters the merged products differ from peft's
three in the last bits). Sampling draws from the same distribution, by inverting the
cumulative distribution (`sample_token`), so not the same tokens for a given seed. Each prompt
is prefilled once for its G completions. Models it cannot mirror (other architectures, eager
attention, sliding windows, extra logits processors in the generation config) are left to
`generate`: see `supports`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpo import heap
from grpo.model.loading import LLAMA_LIKE, causal_lm
from grpo.rollout import kernels, products
from grpo.rollout.base import StopOnPattern
from grpo.rollout.hf_generate import TransformersBackend
from grpo.rollout.settings import SamplingSettings

# Generation-config fields that would add logits processors this loop does not apply.
UNSUPPORTED_GENERATION_FIELDS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "min_length",
)

_DEFAULTS = GenerationConfig()
SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' modules for F.silu
# stop(ids so far, scores) -> (N,) bool, True where a row is done (a transformers StoppingCriteria).
Stop = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def supports(model: PreTrainedModel) -> bool:
    """True when `sample` mirrors `generate` exactly for this model."""
    lm = causal_lm(model)
    config = lm.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (
        config.model_type in LLAMA_LIKE
        and config._attn_implementation == "sdpa"
        and all(t == "full_attention" for t in getattr(config, "layer_types", None) or [])
        and rope not in ("dynamic", "longrope")
        and all(
            getattr(lm.generation_config, f, None) == getattr(_DEFAULTS, f, None)
            for f in UNSUPPORTED_GENERATION_FIELDS
        )
    )


def sample_token(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row from `probs` (N, V) by inverting its cumulative sum.

    Same distribution as `torch.multinomial(probs, 1)`, which on CPU draws one exponential
    number per vocabulary entry (milliseconds per step for a 49k vocabulary); this draws one
    uniform number per row. The float64 cumsum keeps each token's share exact to ~1e-16.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_(max=probs.shape[1] - 1)


def _rms_norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module.forward`, or for an fp32 Llama/Qwen RMSNorm one fused `F.rms_norm` call, which
    gives the same numbers (mean of squares, rsqrt, scale by the weight) in one op, not seven."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or eps is None or weight is None:
        return module.forward
    if weight.dtype != torch.float32:  # transformers rounds to the input dtype before scaling
        return module.forward
    return partial(F.rms_norm, normalized_shape=weight.shape, weight=weight, eps=eps)


def _residual_norms(body: nn.Module) -> list[nn.Module]:
    """The RMSNorms in the order the residual stream meets them: each layer's two, the final."""
    pairs = [(layer.input_layernorm, layer.post_attention_layernorm) for layer in body.layers]
    return [norm for pair in pairs for norm in pair] + [body.norm]


def fused_ops(lm: PreTrainedModel, do_sample: bool) -> ModuleType | None:
    """`decode_ops.cpp` (`grpo.rollout.kernels`) for a `sample` call that can use it: sampling
    (greedy decoding stays bit-exact with `generate`) on the CPU, fp32 RMSNorms
    (`_rms_norm`'s fused case), SwiGLU, and widths its 8-float vectors divide; else None."""
    body, config = lm.model, lm.config
    widths = (config.hidden_size, config.intermediate_size, body.layers[0].self_attn.head_dim)
    suits = (
        do_sample
        and lm.device.type == "cpu"
        and all(isinstance(_rms_norm(norm), partial) for norm in _residual_norms(body))
        and all(type(layer.mlp.act_fn).__name__ in SILU for layer in body.layers)
        and all(w % 8 == 0 for w in widths)
    )
    return kernels.load("decode_ops") if suits else None


class _Decoder:
    """One token per row through the model's layers, with preallocated key/value buffers.

    Modules are called through `.forward` (no hook dispatch); rotary embedding uses
    q * cos + roll(q) * sin', with sin' the sine with its first half negated, which is
    transformers' q * cos + rotate_half(q) * sin to the bit. With `stream`, plain fp32 linear
    layers use `products.streaming_product`; with `fuse`, q/k/v and gate/up are one product
    each (`products.product`); with `ops`, `decode_ops.cpp` does the rest (`_fused_step`).
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        cache: DynamicCache,
        prompt_mask: torch.Tensor,
        steps: int,
        copies: int,
        stream: bool,
        fuse: bool,
        ops: ModuleType | None = None,
    ):
        body = lm.model
        self.ops = ops
        if ops is not None:  # for the kernel: each RMSNorm's (weight, eps)
            self.norm_weights = [(m.weight, m.variance_epsilon) for m in _residual_norms(body)]
        n, p = prompt_mask.shape
        self.embed, self.norm = body.embed_tokens, _rms_norm(body.norm)
        self.head = products.projection(lm.lm_head, n, stream, fuse)
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    _rms_norm(layer.input_layernorm),
                    attn,
                    products.projections((attn.q_proj, attn.k_proj, attn.v_proj), n, stream, fuse),
                    products.projection(attn.o_proj, n, stream, fuse),
                    *(  # Qwen3 normalises q and k per head
                        _rms_norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
                        _rms_norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
                    ),
                    _rms_norm(layer.post_attention_layernorm),
                    products.projections((mlp.gate_proj, mlp.up_proj), n, stream, fuse),
                    products.projection(mlp.down_proj, n, stream, fuse),
                    mlp.act_fn,
                )
            )
        self.length = p  # filled cache slots
        self.keys, self.values = [], []
        for layer in cache.layers:  # each prompt's prefill, copied into its `copies` rows
            for prefilled, buffers in (
                (layer.keys, self.keys),
                (layer.values, self.values),
            ):
                heads, dim = prefilled.shape[1], prefilled.shape[-1]
                buffers.append(prefilled.new_empty(n, heads, p + steps, dim))
                grouped = buffers[-1].view(n // copies, copies, heads, p + steps, dim)
                grouped[:, :, :, :p] = prefilled[:, None]
        # transformers passes no mask (and uses enable_gqa) when no row is padded.
        self.mask = None
        if ops is not None:  # the kernel reads one row of slots per batch row
            self.mask = torch.ones(n, p + steps, dtype=torch.bool, device=prompt_mask.device)
            self.mask[:, :p] = prompt_mask.bool()
        elif not bool(prompt_mask.all()):
            self.mask = torch.ones(n, 1, 1, p + steps, dtype=torch.bool, device=prompt_mask.device)
            self.mask[:, 0, 0, :p] = prompt_mask.bool()
        # Rotary tables for every position a row can reach, indexed by position each step.
        positions = torch.arange(int(prompt_mask.sum(1).max()) + steps, device=prompt_mask.device)
        cos, sin = body.rotary_emb(self.keys[0][:1, :1, :1], positions[None])
        half = sin.shape[-1] // 2
        self.cos, self.sin = (
            cos[0],
            torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1),
        )

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits (N, V) after feeding `tokens` (N,) at `positions` (N,)."""
        if self.ops is not None:
            return self._fused_step(tokens, positions)
        n, slot = tokens.shape[0], self.length
        end = slot + 1
        mask = None if self.mask is None else self.mask[..., :end]
        cos = self.cos.index_select(0, positions)[:, None, None]
        sin = self.sin.index_select(0, positions)[:, None, None]
        h = self.embed.forward(tokens[:, None])
        for i, layer in enumerate(self.layers):
            norm1, attn, qkv, o_proj, q_norm, k_norm, norm2, gate_up, down, act = layer
            x, d, groups = norm1(h), attn.head_dim, attn.num_key_value_groups
            q, k, v = (y.view(n, 1, -1, d) for y in qkv(x))
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            qk = torch.cat((q, k), dim=2).transpose(1, 2)
            qk = qk * cos + qk.roll(d // 2, -1) * sin
            q, k = qk[:, : q.shape[2]], qk[:, q.shape[2] :]
            self.keys[i][:, :, slot:end] = k
            self.values[i][:, :, slot:end] = v.transpose(1, 2)
            kwargs = {}
            if groups > 1 and mask is None:
                kwargs["enable_gqa"] = True
            elif groups > 1:  # one query per row: fold the query heads onto their key/value head
                q = q.reshape(n, -1, groups, d)
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, :end],
                self.values[i][:, :, :end],
                attn_mask=mask,
                dropout_p=0.0,
                scale=attn.scaling,
                is_causal=False,
                **kwargs,
            )
            h = h + o_proj(out.reshape(n, 1, -1))
            x = norm2(h)
            gate, up = gate_up(x)
            h = h + down(act(gate) * up)  # transformers' LlamaMLP / Qwen2MLP / Qwen3MLP
        self.length = end
        if self.mask is not None:
            self.mask[:, 0, 0, slot] = True
        return self.head(self.norm(h))[:, -1].to(copy=True, dtype=torch.float32)

    def _fused_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`step` with the operations between products fused (`fused_ops`): rotary embedding,
        the cache write and attention in one call per layer, each residual add with the
        RMSNorm after it, SwiGLU; the same arithmetic rounded in other orders."""
        ops, slot, n = self.ops, self.length, tokens.shape[0]
        norms = iter(self.norm_weights)
        h = self.embed.forward(tokens)  # (N, D), the residual stream, added to in place
        x = ops.add_rms_norm(h, None, *next(norms))
        for i, layer in enumerate(self.layers):
            _, attn, qkv, o_proj, q_norm, k_norm, _, gate_up, down, _ = layer
            q, k, v = qkv(x)
            if q_norm is not None:  # Qwen3: per head, before rotary embedding
                d = attn.head_dim
                q, k = q_norm(q.view(n, -1, d)).view(n, -1), k_norm(k.view(n, -1, d)).view(n, -1)
            out = ops.attend(
                q,
                k,
                v,
                self.cos,
                self.sin,
                positions,
                self.keys[i],
                self.values[i],
                slot,
                self.mask,
                attn.scaling,
            )
            x = ops.add_rms_norm(h, o_proj(out), *next(norms))
            x = ops.add_rms_norm(h, down(ops.silu_mul(*gate_up(x))), *next(norms))
        self.length = slot + 1
        return self.head(x).to(copy=True, dtype=torch.float32)


def inference(fn: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    """`fn` under `torch.inference_mode`, its tensor results cloned out of it.

    Inference mode skips autograd's bookkeeping (version counters, view tracking), which is a
    sizeable part of each small operation: the tiny model decodes 15% faster than under
    `no_grad`, with the same numbers. Inference tensors cannot enter autograd later, hence
    the clones: the training passes take these results as inputs.
    """

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        with torch.inference_mode():
            results = fn(*args, **kwargs)
        return tuple(r.clone() if isinstance(r, torch.Tensor) else r for r in results)

    return run


@inference
def sample(
    model: PreTrainedModel,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    n: int,
    settings: SamplingSettings,
    stop: Stop | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode up to `settings.max_new_tokens` tokens, `n` times per prompt.

    `prompt_ids` (B, P) are left-padded distinct prompts; each is prefilled once and its
    key/value cache copied to its rows (N = B * n, grouped by prompt); `tokenizer` gives the
    EOS and padding ids. Returns the sequences (N, P + steps), prompt included and finished rows
    padded as `generate` returns them, and, with `settings.keep_logprobs`, the log-probability
    (N, steps) of each new token under the model at the temperature (log_softmax(logits /
    temperature), before min_new_tokens and top_p shape the sampling distribution; 0 on
    padding). Sampling follows `generate`'s order: EOS banned before `min_new_tokens`, then
    temperature, then top-k (0: off), then top-p.
    """
    s, g = settings, n
    max_new_tokens, temperature, do_sample = s.max_new_tokens, s.temperature, s.do_sample
    eos_token_id, pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    lm = causal_lm(model)
    p = prompt_ids.shape[1]
    top_k_filter = TopKLogitsWarper(s.top_k) if do_sample and s.top_k > 0 else None
    top_p_filter = TopPLogitsWarper(s.top_p) if do_sample and s.top_p < 1.0 else None
    positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
    cache = DynamicCache(config=lm.config)
    logits = (
        lm(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        .logits[:, -1]
        .to(copy=True, dtype=torch.float32)
    )
    prompt_ids, prompt_mask, positions, logits = (
        x.repeat_interleave(g, 0) for x in (prompt_ids, prompt_mask, positions, logits)
    )
    n = prompt_ids.shape[0]
    # Sampling only (greedy stays bit-exact with `generate`): big models' weights through a
    # streaming product, small models' projections fused against per-call overhead.
    stream, fuse = products.modes(lm, do_sample)
    if stream:  # copies of weights (packed, LoRA merged) go into memory given back, not on top
        heap.trim()
    ops = fused_ops(lm, do_sample)
    decoder = _Decoder(lm, cache, prompt_mask, max_new_tokens, g, stream, fuse, ops)
    del cache
    ids = prompt_ids.new_full((n, p + max_new_tokens), pad_token_id)
    ids[:, :p] = prompt_ids
    logprobs = torch.zeros(n, max_new_tokens, device=prompt_ids.device) if s.keep_logprobs else None
    unfinished = torch.ones(n, dtype=torch.bool, device=prompt_ids.device)
    position = positions[:, -1]
    steps = 0
    while True:
        scores = logits
        if steps < s.min_new_tokens:
            scores = logits.clone()
            scores[:, eos_token_id] = -torch.inf
        if do_sample:
            scores = scores / temperature if temperature != 1.0 else scores
            if top_k_filter is not None:
                scores = top_k_filter(ids, scores)
            if top_p_filter is not None:
                scores = top_p_filter(ids, scores)
            tokens = sample_token(F.softmax(scores, dim=-1))
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(unfinished, tokens, pad_token_id)
        if logprobs is not None:
            scaled = logits / temperature if temperature != 1.0 else logits
            chosen = scaled.gather(1, tokens[:, None])[:, 0] - scaled.logsumexp(-1)
            logprobs[:, steps] = chosen.masked_fill(~unfinished, 0.0)
        ids[:, p + steps] = tokens
        steps += 1
        unfinished &= tokens != eos_token_id
        if stop is not None:
            unfinished &= ~stop(ids[:, : p + steps], None)
        if steps == max_new_tokens or not bool(unfinished.any()):
            break
        position = position + 1
        logits = decoder.step(tokens, position)
    del decoder
    if stream:
        heap.trim()
    return ids[:, : p + steps], None if logprobs is None else logprobs[:, :steps]


class LeanBackend(TransformersBackend):
    """The `lean` backend: `sample` for the models it mirrors, transformers' `generate` for the
    others (`supports`)."""

    def _decode(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        settings: SamplingSettings,
        stop: StopOnPattern | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not supports(self.model):
            return super()._decode(prompt_ids, prompt_mask, n, settings, stop)
        return sample(self.model, self.tokenizer, prompt_ids, prompt_mask, n, settings, stop)
