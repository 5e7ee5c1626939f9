"""Config checks that run before any model loads; each message names the offending key."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


def _require(ok: bool, key: str, why: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate_config(cfg: DictConfig) -> None:
    """Reject values that would fail later (after minutes of model loading) or silently."""
    alg, tr = cfg.algorithm, cfg.trainer
    g = alg.num_responses_per_prompt
    _require(g >= 2, "algorithm.num_responses_per_prompt", "must be >= 2 (group baseline)", g)
    _require(0 < alg.clip_ratio < 1, "algorithm.clip_ratio", "must be in (0, 1)", alg.clip_ratio)
    _require(alg.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0", alg.kl_coef)
    _require(tr.learning_rate > 0, "trainer.learning_rate", "must be > 0", tr.learning_rate)
    _require(tr.batch_size >= 1, "trainer.batch_size", "must be >= 1", tr.batch_size)
    _require(tr.max_steps >= 1, "trainer.max_steps", "must be >= 1", tr.max_steps)
    _require(tr.max_new_tokens > 0, "trainer.max_new_tokens", "must be > 0", tr.max_new_tokens)
    _require(
        tr.max_prompt_length > 0, "trainer.max_prompt_length", "must be > 0", tr.max_prompt_length
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun/accelerate
    _require(
        tr.batch_size % world == 0,
        "trainer.batch_size",
        f"must be a multiple of the {world} processes (WORLD_SIZE): each takes whole groups",
        tr.batch_size,
    )
    _require(tr.strategy in ("ddp", "fsdp"), "trainer.strategy", "ddp|fsdp", tr.strategy)
    if tr.strategy == "fsdp" and world > 1:  # grpo.distributed: shards the decoder layers
        why = "FSDP here trains LoRA adapters of the decoder layers: needs model.lora.enabled=true"
        _require(cfg.model.lora.enabled, "trainer.strategy", why, tr.strategy)
        why = "FSDP runs keep no checkpoints yet: needs trainer.save_every=0, trainer.resume=null"
        _require(tr.save_every == 0 and tr.resume is None, "trainer.strategy", why, tr.strategy)
    rows, per = tr.batch_size * g // world, f" / {world} processes" if world > 1 else ""
    _require(
        tr.micro_batch_size >= 1 and rows % tr.micro_batch_size == 0,
        "trainer.micro_batch_size",
        f"must divide trainer.batch_size * algorithm.num_responses_per_prompt{per} = {rows}",
        tr.micro_batch_size,
    )
    if cfg.model.lora.enabled and alg.kl_coef > 0:  # grpo.update.Reference: the base, adapters off
        why = "with LoRA the reference is the base model with the adapters off: nothing to offload"
        _require(not tr.offload_reference, "trainer.offload_reference", why, tr.offload_reference)
    size = tr.inference_batch_size
    _require(size is None or size >= 1, "trainer.inference_batch_size", "null or >= 1", size)
    _require(tr.device in ("auto", "cpu", "cuda"), "trainer.device", "auto|cpu|cuda", tr.device)
    budget = tr.eval_max_new_tokens
    _require(budget > 0, "trainer.eval_max_new_tokens", "must be > 0", budget)
    _require(tr.eval_batch_size >= 1, "trainer.eval_batch_size", "must be >= 1", tr.eval_batch_size)
    _require(tr.temperature > 0, "trainer.temperature", "must be > 0", tr.temperature)
    _require(0 < tr.top_p <= 1, "trainer.top_p", "must be in (0, 1]", tr.top_p)
    _require(tr.eval_every >= 0, "trainer.eval_every", "must be >= 0", tr.eval_every)
    _require(tr.save_every >= 0, "trainer.save_every", "must be >= 0", tr.save_every)
    keep = tr.keep_checkpoints
    _require(keep >= 1, "trainer.keep_checkpoints", "must be >= 1", keep)
    threads = tr.num_threads
    _require(threads is None or threads >= 1, "trainer.num_threads", "null or >= 1", threads)
    resume = tr.resume
    _require(
        resume in (None, "auto") or Path(str(resume)).expanduser().exists(),
        "trainer.resume",
        "null, auto, or an existing checkpoint or run folder",
        resume,
    )
    if cfg.data.get("path") is not None:
        for split in ("train", "test"):
            file = Path(cfg.data.path).expanduser() / f"{split}.jsonl"
            _require(file.is_file(), "data.path", f"{split} file not found: {file}", cfg.data.path)
