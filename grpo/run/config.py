"""The config's checks: every value is checked before any model loads.

Two layers, the Hydra way:
- `grpo.run.schema` (imported here, so that Hydra finds it): types and choices, checked
  while Hydra composes the config.
- `validate_config` runs first in `train()`: ranges, cross-field rules, and the names that
  registries hold (policy losses, advantage estimators, KL estimators, aggregations), with
  each entry's settings.

Each error names the key, the value and the rule; the CLI prints it as one line and exits with
code 2 (`one_line`, used by `grpo.train`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grpo.algorithm.advantages import ADVANTAGE_ESTIMATORS
from grpo.algorithm.kl import KL_ESTIMATORS
from grpo.algorithm.loss import AGGREGATIONS
from grpo.algorithm.policy_losses import POLICY_LOSSES
from grpo.algorithm.rollout_correction import ROLLOUT_CORRECTIONS
from grpo.distributed import launched_world_size
from grpo.environments.base import ENVIRONMENTS
from grpo.registry import import_function
from grpo.rollout import vllm_adapters, vllm_engine
from grpo.rollout.backends import BACKENDS
from grpo.rollout.base import BackendLost
from grpo.run.schema import OldLogprobs, Strategy, VLLMMode
from grpo.tasks.dataset import CheckerReward, DatasetTask, build_checker
from grpo.tasks.rewards import FunctionReward


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


# -------------------------------------------------------------------------------- validation
def _require(ok: bool, key: str, why: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def rows_per_rank(cfg: DictConfig) -> int:
    """Completions each process generates and trains on per step."""
    rows = cfg.trainer.batch_size * cfg.algorithm.num_responses_per_prompt
    return rows // launched_world_size()


def max_turns(cfg: DictConfig) -> int:
    """`environment.max_turns`: the model turns of a trajectory (1 for a single-turn
    environment, which has no such setting)."""
    return cfg.environment.get("max_turns", 1)


def micro_batch_size(cfg: DictConfig) -> int:
    """`trainer.micro_batch_size`, or (null) all of a rank's rows in one pass."""
    return cfg.trainer.micro_batch_size or rows_per_rank(cfg)


# (key, rule text, test) for single values; cross-field rules follow in `validate_config`.
RANGES: list[tuple[str, str, Any]] = [
    ("algorithm.num_responses_per_prompt", "must be >= 2 (group baseline)", lambda v: v >= 2),
    ("algorithm.kl.coef", "must be >= 0", lambda v: v >= 0),
    ("algorithm.loss.entropy_coef", "must be >= 0", lambda v: v >= 0),
    ("algorithm.loss.top_entropy_quantile", "must be in (0, 1]", lambda v: 0 < v <= 1),
    ("algorithm.loss.off_policy_mask_threshold", "null or >= 0", lambda v: v is None or v >= 0),
    ("algorithm.update_epochs", "must be >= 1", lambda v: v >= 1),
    ("algorithm.num_mini_batches", "must be >= 1", lambda v: v >= 1),
    ("algorithm.dynamic_sampling.max_extra_rounds", "must be >= 0", lambda v: v >= 0),
    ("algorithm.reference_update.every", "must be >= 0", lambda v: v >= 0),
    ("algorithm.reference_update.mix", "must be in (0, 1]", lambda v: 0 < v <= 1),
    ("rollout.temperature", "must be > 0", lambda v: v > 0),
    ("rollout.top_p", "must be in (0, 1]", lambda v: 0 < v <= 1),
    ("rollout.top_k", "must be >= 0 (0 = off)", lambda v: v >= 0),
    ("rollout.max_new_tokens", "must be > 0", lambda v: v > 0),
    ("rollout.min_new_tokens", "must be >= 0", lambda v: v >= 0),
    ("rollout.max_prompt_length", "must be > 0", lambda v: v > 0),
    ("rollout.max_staleness", "must be >= 0 (0 = the synchronous loop)", lambda v: v >= 0),
    ("rollout.vllm.kv_cache_gib", "must be > 0", lambda v: v > 0),
    ("rollout.vllm.gpu_memory_utilization", "must be in (0, 1)", lambda v: 0 < v < 1),
    ("rollout.vllm.port", "must be in [1, 65535]", lambda v: 1 <= v <= 65535),
    ("rollout.vllm.connect_timeout_s", "must be > 0", lambda v: v > 0),
    ("rollout.vllm.start_timeout_s", "must be > 0", lambda v: v > 0),
    ("rollout.vllm.request_timeout_s", "must be > 0", lambda v: v > 0),
    ("rollout.vllm.tensor_parallel_size", "must be >= 1", lambda v: v >= 1),
    ("trainer.learning_rate", "must be > 0", lambda v: v > 0),
    ("trainer.batch_size", "must be >= 1", lambda v: v >= 1),
    ("trainer.max_steps", "must be >= 1", lambda v: v >= 1),
    ("trainer.micro_batch_size", "null or >= 1", lambda v: v is None or v >= 1),
    ("trainer.micro_batch_tokens", "null or >= 1", lambda v: v is None or v >= 1),
    ("trainer.inference_batch_size", "null or >= 1", lambda v: v is None or v >= 1),
    ("trainer.max_grad_norm", "null or > 0", lambda v: v is None or v > 0),
    ("trainer.save_every", "must be >= 0", lambda v: v >= 0),
    ("trainer.keep_checkpoints", "must be >= 1", lambda v: v >= 1),
    ("trainer.num_threads", "null or >= 1", lambda v: v is None or v >= 1),
    ("eval.every", "must be >= 0", lambda v: v >= 0),
    ("eval.heldout.max_new_tokens", "null or > 0", lambda v: v is None or v > 0),
    ("eval.heldout.batch_size", "must be >= 1", lambda v: v >= 1),
    ("eval.heldout.num_samples", "must be >= 0", lambda v: v >= 0),
    ("eval.heldout.temperature", "must be > 0", lambda v: v > 0),
    ("eval.heldout.top_p", "must be in (0, 1]", lambda v: 0 < v <= 1),
    ("eval.comparison.num_heldout", "must be >= 0", lambda v: v >= 0),
    ("eval.comparison.num_responses_per_prompt", "null or >= 1", lambda v: v is None or v >= 1),
]


def validate_config(cfg: DictConfig) -> None:
    """Reject values that would fail later (after minutes of model loading) or silently: the
    one place each rule is checked (the constructors trust their inputs)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: no value given (??? in the config)")
    for key, why, test in RANGES:
        value = OmegaConf.select(cfg, key)
        _require(test(value), key, why, value)
    alg, tr, ro = cfg.algorithm, cfg.trainer, cfg.rollout
    for registry, prefix in (
        (POLICY_LOSSES, "algorithm.policy_loss"),
        (ADVANTAGE_ESTIMATORS, "algorithm.advantage"),
        (ROLLOUT_CORRECTIONS, "algorithm.rollout_correction"),
        (ENVIRONMENTS, "environment"),
    ):
        node = OmegaConf.to_container(OmegaConf.select(cfg, prefix))
        if "name" not in node:
            raise ConfigError(f"{prefix}.name: missing; registered: {', '.join(registry)}")
        settings = {k: v for k, v in node.items() if k != "name"}
        _registry_check(registry, node["name"], settings, f"{prefix}.name")
    _registry_check(KL_ESTIMATORS, alg.kl.estimator, {}, "algorithm.kl.estimator")
    bounds = alg.rollout_correction
    if "low" in bounds and "high" in bounds:
        why = f"must be <= algorithm.rollout_correction.high = {bounds.high}"
        _require(bounds.low <= bounds.high, "algorithm.rollout_correction.low", why, bounds.low)
    _require(
        not (alg.kl.in_reward and alg.advantage.name == "gdpo"),
        "algorithm.kl.in_reward",
        "gdpo normalises each part of the reward and the KL penalty is in none of them: keep the "
        "KL in the loss (false) or pick another algorithm.advantage",
        alg.kl.in_reward,
    )
    _registry_check(AGGREGATIONS, alg.loss.aggregation, {}, "algorithm.loss.aggregation")
    _registry_check(BACKENDS, ro.backend, {}, "rollout.backend")
    _check_named_functions(cfg)
    _check_environment(cfg)

    world = launched_world_size()
    _require(
        tr.batch_size % world == 0,
        "trainer.batch_size",
        f"must be a multiple of the {world} processes (WORLD_SIZE): each takes whole groups",
        tr.batch_size,
    )
    rows, per = rows_per_rank(cfg), f" / {world} processes" if world > 1 else ""
    size = tr.micro_batch_size
    _require(
        size is None or rows % size == 0,
        "trainer.micro_batch_size",
        f"must divide trainer.batch_size * algorithm.num_responses_per_prompt{per} = {rows}",
        size,
    )
    _require(
        rows % alg.num_mini_batches == 0,
        "algorithm.num_mini_batches",
        f"must divide the {rows} completions each process trains on per step",
        alg.num_mini_batches,
    )
    _require(
        ro.min_new_tokens <= ro.max_new_tokens,
        "rollout.min_new_tokens",
        f"must be <= rollout.max_new_tokens = {ro.max_new_tokens}",
        ro.min_new_tokens,
    )
    heldout = cfg.eval.heldout
    _require(
        not heldout.num_samples or 1 <= heldout.k <= heldout.num_samples,
        "eval.heldout.k",
        f"pass@k and maj@k need 1 <= k <= eval.heldout.num_samples = {heldout.num_samples}",
        heldout.k,
    )
    lora, model = cfg.model.lora.enabled, cfg.model
    _require(
        lora or not model.load_in_4bit,
        "model.load_in_4bit",
        "4-bit base weights train only LoRA adapters (QLoRA): needs model.lora.enabled=true",
        model.load_in_4bit,
    )
    if alg.kl.coef > 0 and lora:  # grpo.actor.reference: the base with the adapters off
        why = "with LoRA the reference is the base model with the adapters off: nothing to offload"
        _require(not tr.offload_reference, "trainer.offload_reference", why, tr.offload_reference)
        why = (
            "reference updates need full fine-tuning (with LoRA the reference is the base "
            "model with the adapters off): set model.lora.enabled=false or every=0"
        )
        every = alg.reference_update.every
        _require(every == 0, "algorithm.reference_update.every", why, every)
    if ro.max_staleness:
        _check_asynchronous(cfg, world)
    engine = alg.old_logprobs == OldLogprobs.engine
    why = (
        "algorithm.old_logprobs=engine makes pi_old the engine's, so the correction's weight "
        "pi_old / pi_engine is 1: set it none, or old_logprobs=trainer (AReaL's decoupled PPO)"
    )
    name = alg.rollout_correction.name
    _require(not engine or name == "none", "algorithm.rollout_correction.name", why, name)
    if ro.backend == "vllm":
        _check_vllm(cfg, world)
    if tr.strategy == Strategy.fsdp and world > 1:
        why = "FSDP shards whole weights only in fp32 or bf16 without 4-bit quantization"
        _require(not model.load_in_4bit, "trainer.strategy", why, tr.strategy)
    for i, prompt in enumerate(cfg.eval.comparison.prompts or []):
        key, why = (
            f"eval.comparison.prompts[{i}]",
            "each fixed problem needs a question and an answer",
        )
        _require({"question", "answer"} <= set(prompt), key, why, prompt)
    resume = tr.resume
    _require(
        resume in (None, "auto") or Path(str(resume)).expanduser().exists(),
        "trainer.resume",
        "null, auto, or an existing checkpoint or run folder",
        resume,
    )


def _check_asynchronous(cfg: DictConfig, world: int) -> None:
    """rollout.max_staleness >= 1: generation on vLLM servers, one trainer process. An
    in-process backend would generate with the weights the trainer is updating, on its cores
    (a thread would need a second copy of the policy; the colocated vLLM engine shares the
    trainer's cores and, on CUDA, its memory), so it is refused."""
    ro = cfg.rollout
    server = ro.backend == "vllm" and ro.vllm.mode == VLLMMode.server
    why = (
        "generation ahead of training needs vLLM servers (rollout.backend=vllm "
        "rollout.vllm.mode=server); 0 for the in-process backends"
    )
    _require(server, "rollout.max_staleness", why, ro.max_staleness)
    why = "generation ahead of training takes one trainer process for now: run it without torchrun"
    _require(world == 1, "rollout.max_staleness", why, ro.max_staleness)


def _check_environment(cfg: DictConfig) -> None:
    """The turn limit, the trajectory budget, and a backend that can run turns row by row."""
    turns, ro, name = max_turns(cfg), cfg.rollout, cfg.environment.name
    why = (
        "an environment of several turns takes max_turns as a setting: the budgets and vLLM's "
        "context length are read from environment.max_turns"
    )
    fixed = ENVIRONMENTS[name].max_turns
    _require(fixed == 1 or "max_turns" in cfg.environment, "environment.name", why, name)
    _require(isinstance(turns, int) and turns >= 1, "environment.max_turns", "must be >= 1", turns)
    why = (
        f"null or >= rollout.max_new_tokens = {ro.max_new_tokens}: a trajectory's budget holds "
        "one model turn at least"
    )
    total = ro.max_total_tokens
    _require(total is None or total >= ro.max_new_tokens, "rollout.max_total_tokens", why, total)
    protocol = cfg.environment.get("protocol")
    chat = bool(cfg.model.get("tokenizer", {}).get("use_chat_template", False))
    why = "the template's tool calls need a chat model (model.tokenizer.use_chat_template=true)"
    _require(protocol != "chat_template" or chat, "environment.protocol", why, protocol)
    tp = ro.vllm.tensor_parallel_size
    why = (
        "the ranks of an engine split over several generate together, and multi-turn "
        "trajectories take different numbers of turns on each: use 1 with a multi-turn "
        "environment"
    )
    split = ro.backend == "vllm" and ro.vllm.mode == VLLMMode.colocate and tp > 1
    _require(turns == 1 or not split, "rollout.vllm.tensor_parallel_size", why, tp)


def _check_lora_sync(cfg: DictConfig) -> None:
    """rollout.backend=vllm with LoRA: the adapter's rank fits vLLM's; no 4-bit base."""
    model = cfg.model
    if model.lora.enabled and cfg.rollout.vllm.lora_sync == "adapter":
        top = vllm_adapters.LORA_RANKS[-1]
        why = f"vLLM serves adapters of rank <= {top} (or set rollout.vllm.lora_sync=merged)"
        _require(model.lora.r <= top, "model.lora.r", why, model.lora.r)
    why = (
        "vLLM 0.32 cannot load a bitsandbytes 4-bit base (it dropped bitsandbytes): "
        "use rollout.backend=lean with a 4-bit base"
    )
    _require(not model.load_in_4bit, "model.load_in_4bit", why, model.load_in_4bit)


def server_addresses(servers: Any) -> list[str] | int | None:
    """`rollout.vllm.servers` read: the host:port list, the count of local servers to start
    (auto: 1), or None when it is neither."""
    if servers == "auto":
        return 1
    if isinstance(servers, int) and not isinstance(servers, bool):
        return servers if servers >= 1 else None
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not servers:
        return None
    for address in servers:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            return None
    return [str(address) for address in servers]


def trains_on_cuda(cfg: DictConfig) -> bool:
    """`trainer.device` is cuda, or auto on a machine with a GPU."""
    return torch.cuda.is_available() and cfg.trainer.device != "cpu"


def weight_transfer(cfg: DictConfig, listed: bool | None = None) -> str:
    """`rollout.vllm.weight_transfer` resolved: auto is files on a CPU; on CUDA nccl for listed
    servers (`listed`, by default read from `rollout.vllm.servers`: each on GPUs of its own) and
    ipc for the server the trainer starts (on its GPU)."""
    choice = str(cfg.rollout.vllm.weight_transfer)
    if choice != "auto":
        return choice
    if listed is None:
        servers = OmegaConf.to_container(cfg.rollout.vllm, resolve=True)["servers"]
        listed = isinstance(server_addresses(servers), list)
    if not trains_on_cuda(cfg):
        return "files"
    return "nccl" if listed else "ipc"


# What vLLM's external launcher reads to place an engine on each rank.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _check_vllm(cfg: DictConfig, world: int) -> None:
    """rollout.backend=vllm: installed; servers the trainer can use, or engines the processes
    can hold; adapters and a model it serves."""
    _require(vllm_engine.available(), "rollout.backend", vllm_engine.INSTALL_HINT, "vllm")
    vllm, model = cfg.rollout.vllm, cfg.model
    if vllm.mode == VLLMMode.server:
        servers = OmegaConf.to_container(vllm, resolve=True)["servers"]
        why = "auto, a count of local servers >= 1, or a list of host:port"
        count = server_addresses(servers)
        _require(count is not None, "rollout.vllm.servers", why, servers)
        why = "vLLM servers take one trainer process for now: run it without torchrun"
        _require(world == 1, "rollout.vllm.mode", why, "server")
        why = (
            "local servers would share this machine's GPUs with the trainer: start each with "
            "`python -m grpo.serve` on its own GPUs (CUDA_VISIBLE_DEVICES) and list them"
        )
        shared = isinstance(count, int) and count > 1 and torch.cuda.is_available()
        _require(not shared, "rollout.vllm.servers", why, servers)
        why = "sleep mode frees the GPU of a colocated engine: set it false with mode=server"
        _require(not vllm.sleep, "rollout.vllm.sleep", why, True)
        transfer, key = str(vllm.weight_transfer), "rollout.vllm.weight_transfer"
        why = (
            "NCCL cannot join two ranks on one GPU, and the server the trainer starts shares its "
            "GPU: ipc (or auto) for it, nccl for listed servers on GPUs of their own"
        )
        _require(transfer != "nccl" or isinstance(count, list), key, why, transfer)
        why = "vLLM's weight-transfer API sends from the trainer's GPU: train on CUDA, or files"
        _require(transfer in ("auto", "files") or trains_on_cuda(cfg), key, why, transfer)
    else:
        tp = vllm.tensor_parallel_size
        why = f"must divide the {world} processes (WORLD_SIZE): each engine spans that many ranks"
        _require(world % tp == 0, "rollout.vllm.tensor_parallel_size", why, tp)
        why = (
            "the comparison runs on rank 0 alone, and an engine split over ranks needs them all: "
            "set it false with rollout.vllm.tensor_parallel_size > 1"
        )
        _require(tp == 1 or not cfg.eval.comparison.at_end, "eval.comparison.at_end", why, True)
        missing = [v for v in LAUNCHER_VARIABLES if v not in os.environ] if world > 1 else []
        why = f"an engine on every rank needs {', '.join(missing)} (torchrun, accelerate, srun)"
        _require(not missing, "rollout.backend", why, "vllm")
    _check_lora_sync(cfg)
    if not torch.cuda.is_available():
        _check_cpu_head_size(model.checkpoint)


def _check_cpu_head_size(checkpoint: Any) -> None:
    """The model's attention head size is one vLLM's CPU attention serves, read from its config
    (no weights load): the tiny model's settings, or a folder's or hub id's config.json."""
    if isinstance(checkpoint, str):
        from transformers import AutoConfig

        try:
            text = AutoConfig.from_pretrained(checkpoint).get_text_config()
        except (OSError, ValueError):  # not readable now: loading the model will say why
            return
        key, value = "model.checkpoint", checkpoint
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    elif "hidden_size" in checkpoint and "num_heads" in checkpoint:  # the tiny model's
        key, value = "model.checkpoint.num_heads", checkpoint.num_heads
        head = checkpoint.hidden_size // checkpoint.num_heads
    else:
        return
    sizes = vllm_engine.cpu_head_sizes()
    why = f"head_dim {head}: vLLM's CPU attention serves head sizes {sizes}"
    _require(head in sizes, key, why, value)


def _registry_check(registry: Any, name: str, settings: dict[str, Any], key: str) -> None:
    try:
        registry.check(name, settings, key)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _target(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _nodes(node: Any, key: str) -> list[tuple[str, dict]]:
    """(key, node) of `node` and of every mapping below it."""
    if not isinstance(node, dict):
        return []
    return [(key, node)] + [x for k, v in node.items() for x in _nodes(v, f"{key}.{k}")]


def _check_named_functions(cfg: DictConfig) -> None:
    """The answer checkers (task=dataset, reward=checker) and reward functions (reward=function)
    that the task and the reward name: a registered checker with its settings, or a function's
    importable dotted path; and reward=checker's checker is the task's."""
    for group in ("task", "reward"):
        for key, node in _nodes(OmegaConf.to_container(cfg[group], resolve=True), group):
            target = node.get("_target_")
            try:
                if target in (_target(DatasetTask), _target(CheckerReward)):
                    build_checker(node.get("checker") or {"name": "exact"}, f"{key}.checker")
                if target == _target(FunctionReward):
                    import_function(node.get("function"), f"{key}.function")
            except ValueError as error:
                raise ConfigError(str(error)) from None
    task_checker, reward_checker = cfg.task.get("checker"), cfg.reward.get("checker")
    if cfg.reward.get("_target_") == _target(CheckerReward) and task_checker is not None:
        _require(
            reward_checker == task_checker,
            "reward.checker",
            f"reward=checker pays what task.checker={OmegaConf.to_container(task_checker)} "
            "counts right: set both alike",
            OmegaConf.to_container(reward_checker) if reward_checker is not None else None,
        )


# ------------------------------------------------------------------------------------ errors
def exit_on_config_error(error: Exception) -> None:
    """A config error: print it as one line naming the key and exit with code 2. Any other
    error returns, to be raised with its traceback."""
    line = one_line(error)
    if line is None:
        return
    # Every rank prints it: under torchrun the first rank to exit ends the others, so a line
    # left to rank 0 alone could be lost.
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def command_line(main: Callable[[], Any]) -> None:
    """Run a `hydra.main` function with composition errors, as config errors, reported as one
    line (exit code 2); any other error keeps its traceback."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors to us
    try:
        main()
    except Exception as error:
        exit_on_config_error(error)
        raise


def one_line(error: BaseException) -> str | None:
    """A config error as one line naming the key, the value and the rule (a lost rollout
    server as its line); None for any other error (a bug, which keeps its traceback)."""
    if isinstance(error, ConfigError | BackendLost):  # a rollout server gone: one line too
        return str(error)
    if isinstance(error, ConfigCompositionException):
        cause = error.__cause__
        if isinstance(cause, OmegaConfBaseException):
            return _omegaconf_line(cause)
        return " ".join(str(error).replace("\t", " ").split("\n")[:1] + _options(str(error)))
    if isinstance(error, OmegaConfBaseException):
        return _omegaconf_line(error)
    if isinstance(error, InstantiationException) and isinstance(error.__cause__, INPUT_ERRORS):
        return f"{error.__cause__}"  # a task's file, a bad row, an unknown setting
    return None


# What a `_target_` raises on bad input (values, files, settings), as opposed to a bug.
INPUT_ERRORS = (ValueError, FileNotFoundError, TypeError)


def _omegaconf_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(getattr(error, "msg", None) or error).split("\n")[0]
    return f"{key}: {message}" if key else message


def _options(message: str) -> list[str]:
    """Hydra's 'Available options' list of a missing config group option, as one phrase."""
    lines = [line.strip() for line in message.split("\n")]
    if "Available options:" not in lines and not any("Available options" in x for x in lines):
        return []
    start = next(i for i, x in enumerate(lines) if "Available options" in x)
    options = [x for x in lines[start + 1 :] if x and " " not in x]
    return [f"(options: {', '.join(options)})"] if options else []
