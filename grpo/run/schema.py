"""The config's schema: dataclasses stored in Hydra's ConfigStore (`conf/train.yaml` lists
`schema` first), so that types, and the choices of enumerated keys, are checked while Hydra
composes the config: `trainer.batch_size=foo` or `trainer.strategy=dp` never reach the code.
The values and their comments live in the YAML files under `conf/`; ranges, cross-field rules
and registry names (the generation backend's too) are checked by
`grpo.run.config.validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LoraSync(StrEnum):
    adapter = "adapter"
    merged = "merged"


class OldLogprobs(StrEnum):
    trainer = "trainer"
    engine = "engine"


class WeightTransfer(StrEnum):
    auto = "auto"
    files = "files"
    nccl = "nccl"
    ipc = "ipc"


class VLLMMode(StrEnum):
    colocate = "colocate"
    server = "server"


class PaddingSide(StrEnum):
    left = "left"
    right = "right"


@dataclass
class LoraSchema:
    enabled: bool = MISSING
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class TokenizerSchema:
    padding_side: PaddingSide = MISSING
    use_chat_template: bool = MISSING


@dataclass
class ModelSchema:
    _target_: str = MISSING
    checkpoint: Any = MISSING
    dtype: Dtype = MISSING
    load_in_4bit: bool = MISSING
    gradient_checkpointing: bool = MISSING
    lm_head_fp32: bool = MISSING
    lora: LoraSchema = field(default_factory=LoraSchema)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)


@dataclass
class KLSchema:
    coef: float = MISSING
    estimator: str = MISSING
    in_reward: bool = MISSING


@dataclass
class LossSchema:
    _target_: str = MISSING
    aggregation: str = MISSING
    entropy_coef: float = MISSING
    top_entropy_quantile: float = MISSING
    off_policy_mask_threshold: float | None = MISSING


@dataclass
class DynamicSamplingSchema:
    enabled: bool = MISSING
    max_extra_rounds: int = MISSING


@dataclass
class ReferenceUpdateSchema:
    every: int = MISSING
    mix: float = MISSING


@dataclass
class SamplerSchema:
    _target_: str = MISSING
    shuffle: bool = MISSING


@dataclass
class AlgorithmSchema:
    num_responses_per_prompt: int = MISSING
    policy_loss: dict[str, Any] = MISSING
    advantage: dict[str, Any] = MISSING
    rollout_correction: dict[str, Any] = MISSING
    old_logprobs: OldLogprobs = MISSING
    kl: KLSchema = field(default_factory=KLSchema)
    loss: LossSchema = field(default_factory=LossSchema)
    update_epochs: int = MISSING
    num_mini_batches: int = MISSING
    mask_truncated: bool = MISSING
    dynamic_sampling: DynamicSamplingSchema = field(default_factory=DynamicSamplingSchema)
    reference_update: ReferenceUpdateSchema = field(default_factory=ReferenceUpdateSchema)
    sampler: SamplerSchema = field(default_factory=SamplerSchema)


@dataclass
class VLLMSchema:
    mode: VLLMMode = MISSING
    kv_cache_gib: float = MISSING
    gpu_memory_utilization: float = MISSING
    enforce_eager: bool = MISSING
    sleep: bool = MISSING
    lora_sync: LoraSync = MISSING
    servers: Any = MISSING  # auto, a count, or a list of host:port (checked in config.py)
    host: str = MISSING
    port: int = MISSING
    connect_timeout_s: float = MISSING
    start_timeout_s: float = MISSING
    request_timeout_s: float = MISSING
    weights_dir: str | None = MISSING
    weight_transfer: WeightTransfer = MISSING
    tensor_parallel_size: int = MISSING


@dataclass
class RolloutSchema:
    backend: str = MISSING  # a name of grpo.rollout.backends.BACKENDS (checked in config.py)
    temperature: float = MISSING
    top_p: float = MISSING
    top_k: int = MISSING
    max_new_tokens: int = MISSING
    min_new_tokens: int = MISSING
    max_prompt_length: int = MISSING
    max_staleness: int = MISSING
    max_total_tokens: int | None = MISSING
    vllm: VLLMSchema = field(default_factory=VLLMSchema)


@dataclass
class TrainerSchema:
    batch_size: int = MISSING
    max_steps: int = MISSING
    learning_rate: float = MISSING
    optimizer: dict[str, Any] = MISSING
    scheduler: dict[str, Any] = MISSING
    micro_batch_size: int | None = MISSING
    micro_batch_tokens: int | None = MISSING
    inference_batch_size: int | None = MISSING
    offload_reference: bool = MISSING
    share_prompts: bool = MISSING
    max_grad_norm: float | None = MISSING
    save_every: int = MISSING
    keep_checkpoints: int = MISSING
    resume: str | None = MISSING
    device: Device = MISSING
    strategy: Strategy = MISSING
    num_threads: int | None = MISSING
    keep_freed_memory: bool = MISSING


@dataclass
class HeldoutSchema:
    _target_: str = MISSING
    max_new_tokens: int | None = MISSING
    batch_size: int = MISSING
    num_samples: int = MISSING
    k: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING


@dataclass
class ComparisonSchema:
    at_end: bool = MISSING
    num_responses_per_prompt: int | None = MISSING
    num_heldout: int = MISSING
    prompts: list[dict[str, str]] | None = MISSING


@dataclass
class EvalSchema:
    every: int = MISSING
    heldout: HeldoutSchema = field(default_factory=HeldoutSchema)
    comparison: ComparisonSchema = field(default_factory=ComparisonSchema)


@dataclass
class PathsSchema:
    output_root: str = MISSING
    multirun_root: str = MISSING
    cache_dir: str = MISSING


@dataclass
class TrainSchema:
    """The whole config's types; `conf/train.yaml` and its groups give the values."""

    seed: int = MISSING
    objective: str = MISSING
    model: ModelSchema = field(default_factory=ModelSchema)
    task: Any = MISSING  # each task class has its own settings (grpo.tasks)
    environment: Any = MISSING  # a name in ENVIRONMENTS and its settings (grpo.environments)
    reward: Any = MISSING  # each reward class has its own settings (grpo.tasks.rewards)
    environment: Any = MISSING  # each environment has its own settings (grpo.environments)
    algorithm: AlgorithmSchema = field(default_factory=AlgorithmSchema)
    rollout: RolloutSchema = field(default_factory=RolloutSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logging: Any = MISSING  # each logger class has its own settings (grpo.run.loggers)
    eval: EvalSchema = field(default_factory=EvalSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)


ConfigStore.instance().store(name="schema", node=TrainSchema)
