"""Generation with vLLM's offline engine inside the training process (TRL calls it "colocate").

`VLLMBackend` holds one `vllm.LLM` built from the policy's checkpoint and fed the policy's weights
after every optimiser step (`sync`). Full fine-tuning, and LoRA with `lora_sync="merged"`: the
whole state dict in the checkpoint's names, LoRA adapters merged into the weights they adapt
(W + B A scaling, computed without touching the policy; none while the adapters are disabled, as
for the comparison's original model), the tied LM head given explicitly, through the worker's
`reload_weights` (on CPU vLLM repacks its linear layers, so `model.load_weights` cannot write
into them). LoRA with `lora_sync="adapter"` (the default): the engine is built with vLLM's LoRA
support, the first sync loads the policy's base weights (so the engine's base is the policy's,
whatever the checkpoint file holds), and every sync after it hands over only the adapter, as a
new version (`grpo.rollout.vllm_adapters`) that generation then names; while the adapters are
disabled, generation names none and samples the base. No 4-bit base: vLLM 0.32 dropped
bitsandbytes (refused in `grpo.run.config`). Prefix caching is off, so no cache outlives a
weight change.

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
vLLM's `stop` (plain strings) cannot express: `RegexStop` (`grpo.rollout.vllm_stop`), a logits
processor, forces EOS once the decoded completion matches; that EOS was not sampled and is
dropped, so the completion ends where the text matched, as with the lean decoder. The engine
returns each sampled token's log-prob of the distribution it sampled from
(`logprobs_mode="processed_logprobs"`: after temperature, top-k, top-p and min_tokens), kept as
`Rollout.sampling_logprobs` for the rollout-vs-training correction. The engine's settings
(`engine_args`), the requests (`sampling_requests`) and the completions they give
(`finished_completions`, `to_rollout`) are shared with the client of vLLM servers
(`grpo.rollout.vllm_server`).

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo import distributed
from grpo.batch import Rollout
from grpo.model.loading import Policy, causal_lm
from grpo.rollout.base import Backend, listed_rollout
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.vllm_adapters import AdapterVersions, adapter_rank, engine_rank

INSTALL_HINT = "rollout.backend=vllm needs vLLM: run `make install-vllm`"
# The task's regex stop rule as a logits processor, named for vLLM to import (in a server too).
REGEX_STOP = "grpo.rollout.vllm_stop:RegexStop"
# Prompt tokens per engine step on CPU (vLLM's default), raised to the longest request if longer.
CPU_BATCHED_TOKENS = 2048


def available() -> bool:
    """Whether vLLM is installed (`make install-vllm`)."""
    return importlib.util.find_spec("vllm") is not None


def hf_weights(model: PreTrainedModel, merged: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as the checkpoint names them, active LoRA adapters merged
    (W + delta; disabled adapters add nothing; `merged=False`: the base weights alone). Read as
    parameters: FSDP's state-dict hook would reshard a gathered model."""
    lm = causal_lm(model)
    deltas = {}
    for name, module in lm.named_modules():
        lora = hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
        if lora and merged and not module.disable_adapters:
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


def engine_args(
    checkpoint: str,
    dtype: torch.dtype | str,
    settings: SamplingSettings,
    *,
    kv_cache_gib: float,
    gpu_memory_utilization: float,
    enforce_eager: bool,
    sleep: bool = False,
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """The engine's settings, in one place for the engine in this process (`vllm.LLM(**args)`)
    and for a server (`grpo.rollout.vllm_server.server_command` turns them into its flags):
    the checkpoint's model and tokenizer, the policy's dtype, room for the longest prompt and
    trajectory (`SamplingSettings.context_length`), the log-probs of the distribution sampled
    from, the regex stop rule, no prefix cache (no cache outlives a weight change); the KV cache
    in GiB and whole prefills on CPU, a fraction of the GPU on CUDA; with `lora_rank`, vLLM's
    LoRA support for one adapter of that rank (rounded up to a rank vLLM is built for)."""
    memory = (
        {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": sleep}
        if torch.cuda.is_available()
        else {
            "kv_cache_memory_bytes": int(kv_cache_gib * 2**30),
            # vLLM's CPU build dies when chunked prefill cuts a seeded request's prompt (it
            # rewinds the request's generator, which only CUDA generators allow): whole prefills
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(settings.context_length, CPU_BATCHED_TOKENS),
        }
    )
    args = {
        "model": checkpoint,
        "dtype": str(dtype).removeprefix("torch."),
        "max_model_len": settings.context_length,
        "enforce_eager": enforce_eager,
        "enable_prefix_caching": False,
        "logprobs_mode": "processed_logprobs",
        "logits_processors": [REGEX_STOP],
        "seed": 0,
        **memory,
    }
    if lora_rank is not None:
        args |= {"enable_lora": True, "max_lora_rank": engine_rank(lora_rank), "max_loras": 1}
    return args


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
        return {}
    return {
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": tensor_parallel_size,
        "seed": distributed.rank() // tensor_parallel_size,
    }


class VLLMBackend(Backend):
    """The `vllm` backend: vLLM's offline engine on the policy's checkpoint, fed the policy's
    weights or adapters (see the module docstring); `rollout.vllm` gives its keyword
    settings."""

    def __init__(
        self,
        policy: Policy,
        settings: SamplingSettings,
        *,
        kv_cache_gib: float = 0.25,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        sleep: bool = False,
        lora_sync: str = "adapter",
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

        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_gib
        as_adapters = policy.uses_lora and lora_sync == "adapter"
        args = engine_args(
            policy.checkpoint,
            policy.model.dtype,
            settings,
            kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            sleep=sleep,
            lora_rank=adapter_rank(policy.model) if as_adapters else None,
        )
        with _undone_side_effects():
            self.llm = LLM(**args | parallel_args(tensor_parallel_size))
        if distributed.world_size() > 1:
            # Before the process group goes (at exit): the engine's groups are destroyed with it.
            atexit.register(self.llm.llm_engine.engine_core.shutdown)
        self.adapters = AdapterVersions(self.llm.llm_engine) if as_adapters else None
        self.base_loaded = False
        self.sleeps = torch.cuda.is_available() and sleep
        if self.sleeps:
            self.llm.sleep(level=1)

    def sync(self, model: PreTrainedModel) -> float:
        """Load `model`'s current weights into the engine (every rank at once; FSDP: the whole
        weights, gathered; with adapter sync: the base weights the first time, then its adapter
        alone); returns the seconds it took."""
        start = time.perf_counter()
        if self.sleeps:
            self.llm.wake_up()
        with distributed.gathered(model):
            if self.adapters is None or not self.base_loaded:
                weights = iter(list(hf_weights(model, merged=self.adapters is None)))
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
                )
                self.base_loaded = True
            if self.adapters is not None:
                self.adapters.update(model)
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
        from vllm import SamplingParams, TokensPrompt

        if self.sleeps:
            self.llm.wake_up()
        requests = sampling_requests(prompt_ids, prompt_mask, n, settings)
        outputs = self._generate(
            [TokensPrompt(prompt_token_ids=ids) for ids, _ in requests],
            [SamplingParams(**fields, detokenize=False) for _, fields in requests],
        )
        if self.sleeps:
            self.llm.sleep(level=1)
        samples = []
        for output in outputs:
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logp = [step[t].logprob for step, t in zip(sample.logprobs, ids, strict=True)]
                samples.append((ids, logp, sample.finish_reason))
        completions = finished_completions(self.tokenizer, settings, samples)
        return to_rollout(self.tokenizer, prompt_ids, prompt_mask, n, completions)

    def _generate(self, requests: list[Any], params: list[Any]) -> list[Any]:
        """The engine's outputs for `requests`. The ranks of a tensor-parallel engine must send
        it the same requests: each sends all of theirs (gathered, seeds included) and keeps its
        own outputs."""
        adapter = self.adapters.request if self.adapters is not None else None
        if self.engine_ranks is None:
            return self.llm.generate(requests, params, use_tqdm=False, lora_request=adapter)
        everyone: list[Any] = [None] * dist.get_world_size(self.engine_ranks)
        dist.all_gather_object(everyone, (requests, params), group=self.engine_ranks)
        outputs = self.llm.generate(
            [r for rs, _ in everyone for r in rs],
            [p for _, ps in everyone for p in ps],
            use_tqdm=False,
            lora_request=adapter,
        )
        start = sum(len(rs) for rs, _ in everyone[: dist.get_rank(self.engine_ranks)])
        return outputs[start : start + len(requests)]


def sampling_requests(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int, settings: SamplingSettings
) -> list[tuple[list[int], dict[str, Any]]]:
    """Each prompt's token ids (padding dropped) and the fields of vLLM's `SamplingParams` for
    its `n` completions (also those of a completion request to a server), each prompt seeded
    from torch's generator (or `settings.seed_generator`) in turn; the stop regex rides in
    `extra_args`."""
    s = settings
    requests = []
    for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True):
        fields = {
            "n": n,
            "temperature": s.temperature if s.do_sample else 0.0,
            "top_p": s.top_p if s.do_sample else 1.0,
            "top_k": s.top_k if s.do_sample and s.top_k > 0 else -1,
            "max_tokens": s.max_new_tokens,
            "min_tokens": s.min_new_tokens,
            "logprobs": 0,
            "seed": int(torch.randint(2**31 - 1, (), generator=s.seed_generator)),
            "extra_args": {"stop_regex": s.stop_pattern} if s.stop_pattern else None,
        }
        requests.append(([t for t, m in zip(ids, mask, strict=True) if m], fields))
    return requests


def finished_completions(
    tokenizer: PreTrainedTokenizerBase,
    settings: SamplingSettings,
    samples: Iterable[tuple[list[int], list[float], str]],
) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """The engine's samples (token ids, their log-probs, finish reason) as completions for
    `to_rollout`: the EOS that the stop pattern forced is dropped (it was not sampled, and the
    completion ends where the text matched), and a completion cut at the budget is truncated."""
    regex = re.compile(settings.stop_pattern) if settings.stop_pattern else None
    eos = tokenizer.eos_token_id
    tokens, logprobs, truncated = [], [], []
    for ids, logp, finish_reason in samples:
        forced = (
            regex is not None
            and ids[-1:] == [eos]
            and regex.search(tokenizer.decode(ids[:-1], skip_special_tokens=True))
        )
        if forced:
            ids, logp = ids[:-1], logp[:-1]
        tokens.append(ids)
        logprobs.append(logp)
        truncated.append(finish_reason == "length" and not forced)
    return tokens, logprobs, truncated


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
    return listed_rollout(tokenizer, prompt_ids, prompt_mask, n, tokens, truncated, logprobs)
