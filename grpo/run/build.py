"""The config turned into the run's objects, in one place for the trainer and the scripts:
the loss, the rollout source (backend chosen and built here), the evaluator, the update's
settings."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from grpo.actor.update import UpdateSettings
from grpo.algorithm.loss import GRPOLoss
from grpo.environments.base import ENVIRONMENTS, Environment
from grpo.evaluation.heldout import Evaluator
from grpo.model.loading import Policy
from grpo.rollout.backends import build_backend
from grpo.rollout.chat_tools import check_tool_template
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource
from grpo.run.config import ConfigError, max_turns, micro_batch_size, weight_transfer
from grpo.tasks.base import Task
from grpo.tasks.rewards import Reward


def build_loss(cfg: DictConfig) -> GRPOLoss:
    """`algorithm.loss` with its policy loss, KL and rollout correction, and the generation
    budget (Dr. GRPO's constant)."""
    alg = cfg.algorithm
    return instantiate(
        alg.loss,
        policy_loss=alg.policy_loss,
        kl=alg.kl,
        rollout_correction=alg.rollout_correction,
        max_completion_length=cfg.rollout.max_new_tokens,
    )


def sampling_settings(cfg: DictConfig, task: Task) -> SamplingSettings:
    """The training rollout's sampling; the backend's log-probs are kept when a rollout
    correction reads them or they are pi_old (`algorithm.old_logprobs=engine`); a multi-turn
    environment's trajectories get their budget (`rollout.max_total_tokens`)."""
    alg = cfg.algorithm
    keep = alg.rollout_correction.name != "none" or alg.old_logprobs == "engine"
    return SamplingSettings.from_config(cfg.rollout, task.stop_pattern, keep, max_turns(cfg))


def build_environment(cfg: DictConfig) -> Environment:
    """The environment `environment.name` with its settings (the node's other keys), built
    before any model loads (it starts nothing: a tool's sandbox starts at its first call); a
    setting it refuses (a limit that is not positive) is a config error naming its key."""
    settings = OmegaConf.to_container(cfg.environment, resolve=True)
    try:
        return ENVIRONMENTS[settings.pop("name")](**settings)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def build_source(
    cfg: DictConfig,
    task: Task,
    policy: Policy,
    reward: Reward,
    sampling: SamplingSettings,
    environment: Environment,
    servers: list[str] | None = None,
) -> RolloutSource:
    """The rollout source on `policy` with the configured backend (`rollout.backend`, its
    settings under `rollout.<backend>`), which holds the policy's current weights, and the
    environment (`build_environment`); `servers`: the vLLM servers' addresses in use
    (`grpo.run.servers.rollout_servers`), for `rollout.vllm.servers=auto` or a count."""
    name = cfg.rollout.backend
    options: dict[str, Any] = {}
    if name in cfg.rollout:
        options = OmegaConf.to_container(cfg.rollout[name], resolve=True)
    if servers is not None:
        options["servers"] = servers
        options["weight_transfer"] = weight_transfer(cfg)
    if environment.observation_role == "tool":  # tool results written by the chat template
        try:
            check_tool_template(policy.tokenizer, environment.tools)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    backend = build_backend(name, policy, sampling, options)
    return RolloutSource(task, policy, backend, reward, environment)


def build_evaluator(
    cfg: DictConfig, source: RolloutSource, sampling: SamplingSettings
) -> Evaluator:
    """The held-out evaluator (`eval.heldout`) on `source` (passed after instantiation: Hydra
    would turn the settings dataclass into a config node)."""
    return instantiate(cfg.eval.heldout, _partial_=True)(source=source, sampling=sampling)


def update_settings(cfg: DictConfig) -> UpdateSettings:
    """The actor's settings from `trainer.*`, `algorithm.*` and the sampling temperature."""
    alg, tr = cfg.algorithm, cfg.trainer
    size = micro_batch_size(cfg)
    several = alg.update_epochs * alg.num_mini_batches > 1  # optimiser steps on one batch
    engine_as_old = alg.old_logprobs == "engine"  # then pi_old is given, not recomputed
    return UpdateSettings(
        temperature=cfg.rollout.temperature,
        micro_batch_size=size,
        micro_batch_tokens=tr.micro_batch_tokens,
        inference_batch_size=tr.inference_batch_size or size,
        share_prompts=tr.share_prompts,
        max_grad_norm=tr.max_grad_norm,
        epochs=alg.update_epochs,
        num_mini_batches=alg.num_mini_batches,
        mask_truncated=alg.mask_truncated,
        need_old=(several and not engine_as_old) or alg.kl.in_reward,
        engine_as_old=engine_as_old,
        keep_freed_memory=tr.keep_freed_memory,
    )
