"""The generation backends by name (`rollout.backend`), and the one place a backend is built.

Each backend is one module with one class (`grpo.rollout.base.Backend`) and one line here:
- `lean`: the lean decoder (`grpo.rollout.lean`) for Llama/Qwen2/Qwen3, transformers' `generate`
  for other models;
- `transformers`: transformers' `generate` (`grpo.rollout.hf_generate`);
- `vllm`: vLLM's offline engine in every training process (`grpo.rollout.vllm_engine`,
  `make install-vllm`), fed the policy's weights after every optimiser step.
"""

from __future__ import annotations

from typing import Any

from grpo.model.loading import Policy
from grpo.registry import Registry
from grpo.rollout.base import Backend
from grpo.rollout.hf_generate import TransformersBackend
from grpo.rollout.lean import LeanBackend
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.vllm_engine import VLLMBackend

BACKENDS = Registry("generation backend")
BACKENDS.register("lean")(LeanBackend)
BACKENDS.register("transformers")(TransformersBackend)
BACKENDS.register("vllm")(VLLMBackend)


def build_backend(
    name: str, policy: Policy, settings: SamplingSettings, options: dict[str, Any]
) -> Backend:
    """Backend `name` on `policy`, with its keyword settings `options` (`rollout.<name>`), already
    holding the policy's current weights."""
    backend = BACKENDS[name](policy, settings, **options)
    backend.sync(policy.model)
    return backend
