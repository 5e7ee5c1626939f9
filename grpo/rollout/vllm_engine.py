"""Generation with vLLM's offline engine inside the training process (TRL calls it "colocate").

`VLLMBackend` holds one `vllm.LLM` built from the policy's checkpoint and fed the policy's weights
after every optimiser step (`sync`): the whole weights in the checkpoint's names, LoRA adapters
merged into the weights they adapt (W + B A scaling, computed without touching the policy; none
while the adapters are disabled, as for the comparison's original model), the
tied LM head given explicitly, through the worker's `reload_weights` (on CPU vLLM repacks its
linear layers, so `model.load_weights` cannot write into them). Prefix caching is off, so no
cache outlives a weight change.

Under torchrun, accelerate or SLURM (`grpo.distributed`) every rank holds an engine: vLLM's
external launcher builds them all at once on the running process group, one engine per
`tensor_parallel_size` consecutive ranks (`parallel_args`; vLLM reads RANK and LOCAL_RANK). Each
rank generates its own share of the groups with its own seeds; the ranks of a tensor-parallel
engine must send it the same requests, so they gather theirs (seeds included) and each keeps its
own outputs (`_generate`, as TRL's colocate mode does), and every rank syncs after each step,
with FSDP from the gathered whole weights. The engines are shut down at exit before the process
group goes. vLLM's CPU build runs both layouts over gloo (tested with 2 processes).

Sampling follows the other backends: the same prompt tokens (our tokenizer, our chat template,
`TokensPrompt`), n = G per prompt, temperature, top-p, top-k, min/max new tokens, and one seed per
prompt drawn from torch's generator, so runs reproduce. The task's stop pattern is a regex, which
vLLM's `stop` (plain strings) cannot express: `RegexStop`, a logits processor, forces EOS once the
decoded completion matches; that EOS was not sampled and is dropped, so the completion ends where
the text matched, as with the lean decoder. The engine returns each sampled token's log-prob of
the distribution it sampled from (`logprobs_mode="processed_logprobs"`: after temperature, top-k,
top-p and min_tokens), kept as `Rollout.sampling_logprobs` for the rollout-vs-training
correction.

Side effects of `vllm.LLM` that are undone here: it reseeds python, numpy and torch (their states
are restored) and makes `torch.set_num_threads` a no-op (the original is put back). Its threads
are the process's torch threads at creation. On CPU the KV cache takes `kv_cache_gib`; on CUDA
vLLM takes `gpu_memory_utilization` of the GPU, and with `sleep` it releases its weights and KV
cache while the policy trains (vLLM's sleep mode: CUDA only).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo import distributed
from grpo.batch import Rollout
from grpo.model.loading import Policy, causal_lm
from grpo.rollout.base import Backend
from grpo.rollout.settings import SamplingSettings

INSTALL_HINT = "rollout.backend=vllm needs vLLM: run `make install-vllm`"


def available() -> bool:
    """Whether vLLM is installed (`make install-vllm`)."""
    return importlib.util.find_spec("vllm") is not None


def hf_weights(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as the checkpoint names them, active LoRA adapters merged
    (W + delta; disabled adapters add nothing). Read as parameters: FSDP's state-dict hook
    would reshard a gathered model."""
    lm = causal_lm(model)
    deltas = {}
    for name, module in lm.named_modules():
        lora = hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
        if lora and not module.disable_adapters:
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).detach()
                deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    names = set()
    for name, tensor in lm.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        names.add(name)
        yield name, (tensor + deltas[name] if name in deltas else tensor).detach()
    if "lm_head.weight" not in names:  # tied: the engine keeps its own copy of the head
        yield "lm_head.weight", lm.get_output_embeddings().weight.detach()


@contextmanager
def _undone_side_effects() -> Iterator[None]:
    """Keep the random states and torch.set_num_threads that creating an LLM changes."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _regex_stop_processor():
    """A vLLM (V1) logits processor that forces EOS once the decoded completion matches the
    request's `extra_args["stop_regex"]`."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class RegexStop(AdapterLogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory) -> None:
            super().__init__(vllm_config, device, is_pin_memory)
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
            self.eos = self.tokenizer.eos_token_id

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token wins

        def new_req_logits_processor(self, params):
            pattern = (params.extra_args or {}).get("stop_regex")
            if not pattern:
                return None
            regex, decode, eos = re.compile(pattern), self.tokenizer.decode, self.eos

            def force_eos(output_ids, logits):
                if output_ids and regex.search(decode(output_ids, skip_special_tokens=True)):
                    forced = torch.full_like(logits, -torch.inf)
                    forced[eos] = 0.0
                    return forced
                return logits

            return force_eos

    return RegexStop


def cpu_head_sizes() -> list[int]:
    """The attention head sizes vLLM's CPU attention serves (its kernels are built per size)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


def parallel_args(tensor_parallel_size: int) -> dict[str, Any]:
    """vLLM's arguments placing this process's engine: in one process, its own; under
    torch.distributed (torchrun, accelerate, SLURM) vLLM's external launcher, which builds one
    engine per `tensor_parallel_size` consecutive ranks on the running process group (it reads
    RANK and LOCAL_RANK), seeded alike within an engine."""
    if distributed.world_size() == 1:
        return {"seed": 0}
    return {
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": tensor_parallel_size,
        "seed": distributed.rank() // tensor_parallel_size,
    }


class VLLMBackend(Backend):
    """The `vllm` backend: vLLM's offline engine on the policy's checkpoint, fed the policy's
    weights (see the module docstring); `rollout.vllm` gives its keyword settings."""

    def __init__(
        self,
        policy: Policy,
        settings: SamplingSettings,
        *,
        kv_cache_gib: float = 0.25,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        sleep: bool = False,
        tensor_parallel_size: int = 1,
    ) -> None:
        super().__init__(policy, settings)
        self.ranks_per_engine = tensor_parallel_size
        # The ranks of one engine, to gather their prompts (all ranks make the groups together).
        self.engine_ranks = (
            dist.new_subgroups(tensor_parallel_size, backend="gloo")[0]
            if tensor_parallel_size > 1
            else None
        )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        cuda = torch.cuda.is_available()
        memory = (
            {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": sleep}
            if cuda
            else {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        )
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the size above
        with _undone_side_effects():
            self.llm = LLM(
                model=policy.checkpoint,
                dtype=str(policy.model.dtype).removeprefix("torch."),
                max_model_len=settings.max_prompt_length + settings.max_new_tokens,
                enforce_eager=enforce_eager,
                enable_prefix_caching=False,
                logprobs_mode="processed_logprobs",
                logits_processors=[_regex_stop_processor()],
                **parallel_args(tensor_parallel_size),
                **memory,
            )
        if distributed.world_size() > 1:
            # Before the process group goes (at exit): the engine's groups are destroyed with it.
            atexit.register(self.llm.llm_engine.engine_core.shutdown)
        self.sleeps = cuda and sleep
        if self.sleeps:
            self.llm.sleep(level=1)

    def sync(self, model: PreTrainedModel) -> float:
        """Load `model`'s current weights into the engine (every rank at once; FSDP: the whole
        weights, gathered); returns the seconds it took."""
        start = time.perf_counter()
        if self.sleeps:
            self.llm.wake_up()
        with distributed.gathered(model):
            weights = iter(list(hf_weights(model)))
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
            )
        if self.sleeps:
            self.llm.sleep(level=1)
        return time.perf_counter() - start

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        settings: SamplingSettings,
    ) -> Rollout:
        from vllm import TokensPrompt

        if self.sleeps:
            self.llm.wake_up()
        requests, params = [], []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True):
            kept = [t for t, m in zip(ids, mask, strict=True) if m]
            requests.append(TokensPrompt(prompt_token_ids=kept))
            params.append(_sampling_params(n, settings))
        outputs = self._generate(requests, params)
        if self.sleeps:
            self.llm.sleep(level=1)
        tokens, logprobs, truncated = [], [], []
        regex = re.compile(settings.stop_pattern) if settings.stop_pattern else None
        eos = self.tokenizer.eos_token_id
        for output in outputs:
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logp = [step[t].logprob for step, t in zip(sample.logprobs, ids, strict=True)]
                forced = (
                    regex is not None
                    and ids[-1:] == [eos]
                    and regex.search(self.tokenizer.decode(ids[:-1], skip_special_tokens=True))
                )
                if forced:  # the EOS the stop pattern forced was not sampled
                    ids, logp = ids[:-1], logp[:-1]
                tokens.append(ids)
                logprobs.append(logp)
                truncated.append(sample.finish_reason == "length" and not forced)
        return to_rollout(self.tokenizer, prompt_ids, prompt_mask, n, (tokens, logprobs, truncated))

    def _generate(self, requests: list[Any], params: list[Any]) -> list[Any]:
        """The engine's outputs for `requests`. The ranks of a tensor-parallel engine must send
        it the same requests: each sends all of theirs (gathered, seeds included) and keeps its
        own outputs."""
        if self.engine_ranks is None:
            return self.llm.generate(requests, params, use_tqdm=False)
        everyone: list[Any] = [None] * dist.get_world_size(self.engine_ranks)
        dist.all_gather_object(everyone, (requests, params), group=self.engine_ranks)
        outputs = self.llm.generate(
            [r for rs, _ in everyone for r in rs],
            [p for _, ps in everyone for p in ps],
            use_tqdm=False,
        )
        start = sum(len(rs) for rs, _ in everyone[: dist.get_rank(self.engine_ranks)])
        return outputs[start : start + len(requests)]


def _sampling_params(n: int, settings: SamplingSettings) -> Any:
    """vLLM's `SamplingParams` for `n` completions of one prompt, seeded from torch's generator."""
    from vllm import SamplingParams

    s = settings
    return SamplingParams(
        n=n,
        temperature=s.temperature if s.do_sample else 0.0,
        top_p=s.top_p if s.do_sample else 1.0,
        top_k=s.top_k if s.do_sample and s.top_k > 0 else -1,
        max_tokens=s.max_new_tokens,
        min_tokens=s.min_new_tokens,
        logprobs=0,
        seed=int(torch.randint(2**31 - 1, ())),
        extra_args={"stop_regex": s.stop_pattern} if s.stop_pattern else None,
        detokenize=False,
    )


def to_rollout(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    n: int,
    sampled: tuple[list[list[int]], list[list[float]], list[bool]],
) -> Rollout:
    """The engine's completions (token ids, their log-probs, truncation) as a `Rollout`
    (completions right-padded, prompts repeated)."""
    tokens, logprobs, truncated = sampled
    width = max(1, max(len(t) for t in tokens))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(tokens), width), pad, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.long)
    sampled = torch.zeros((len(tokens), width), dtype=torch.float32)
    for row, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        ids[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[row, : len(t)] = 1
        sampled[row, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    device = prompt_ids.device
    return Rollout(
        prompt_ids.repeat_interleave(n, 0),
        prompt_mask.repeat_interleave(n, 0),
        ids.to(device),
        mask.to(device),
        torch.tensor(truncated, device=device),
        tokenizer.batch_decode(ids, skip_special_tokens=True),
        pad,
        sampled.to(device),
    )
