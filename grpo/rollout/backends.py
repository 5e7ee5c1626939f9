"""The generation backends by name (`rollout.backend`), and the one place a backend is built.

Each backend is one module with one class (`grpo.rollout.base.Backend`) and one line here:
- `lean`: the lean decoder (`grpo.rollout.lean`) for Llama/Qwen2/Qwen3, transformers' `generate`
  for other models;
- `transformers`: transformers' `generate` (`grpo.rollout.hf_generate`);
- `vllm`: vLLM's offline engine in every training process (`grpo.rollout.vllm_engine`,
  `make install-vllm`), fed the policy's weights (or its LoRA adapter) after every optimiser
  step; with `rollout.vllm.mode=server`, the client of vLLM servers
  (`grpo.rollout.vllm_server`) instead. `rollout.vllm` holds the settings of both (and of
  `python -m grpo.serve`): each class takes the keys its signature names.
"""

from __future__ import annotations

import inspect
from typing import Any

from grpo.model.loading import Policy
from grpo.registry import Registry
from grpo.rollout.base import Backend
from grpo.rollout.hf_generate import TransformersBackend
from grpo.rollout.lean import LeanBackend
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.vllm_engine import VLLMBackend
from grpo.rollout.vllm_server import VLLMServerBackend

BACKENDS = Registry("generation backend")
BACKENDS.register("lean")(LeanBackend)
BACKENDS.register("transformers")(TransformersBackend)
BACKENDS.register("vllm")(VLLMBackend)


def build_backend(
    name: str, policy: Policy, settings: SamplingSettings, options: dict[str, Any]
) -> Backend:
    """Backend `name` on `policy`, with its keyword settings `options` (`rollout.<name>`), already
    holding the policy's current weights; `vllm` in mode `server` is the client of servers."""
    cls = BACKENDS[name]
    if name == "vllm":  # rollout.vllm: the engine's, the servers' and the client's settings
        cls = VLLMServerBackend if options.get("mode") == "server" else VLLMBackend
        taken = inspect.signature(cls).parameters
        options = {key: value for key, value in options.items() if key in taken}
    backend = cls(policy, settings, **options)
    backend.sync(policy.model)
    return backend
