"""A run's vLLM servers (`rollout.backend=vllm rollout.vllm.mode=server`), checked before the
policy loads.

`rollout_servers(cfg, run_dir)` surrounds a run. With `rollout.vllm.servers` a list of host:port,
each server must answer `/health` within `connect_timeout_s` and serve the config's model and
tokenizer with room for its prompts and completions and the engine settings the config gives
(`check_server`); else the run stops with one line naming the address. With `auto` (one) or a count
N, the trainer starts N local servers itself, each the command `python -m grpo.serve` runs
(`server_command`), on free ports, with their output in `RUN/servers/`, and stops them when the run
ends, however it ends. It yields the addresses in use, for the backend; the config keeps what was
asked (`auto`), so the run folder's config.yaml and the tracker's record it, not this run's ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from grpo.model.loading import load_tokenizer
from grpo.rollout.base import BackendLost
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.vllm_engine import engine_args
from grpo.rollout.vllm_server import (
    check_server,
    free_port,
    server_command,
    server_env,
    wait_until_healthy,
)
from grpo.rollout.vllm_transfer import BACKENDS, transfer_config
from grpo.run.config import ConfigError, max_turns, server_addresses, weight_transfer
from grpo.run.schema import VLLMMode

STOP_WAIT_S = 30  # seconds a server gets to exit after SIGTERM, before SIGKILL


def checkpoint_folder(cfg: DictConfig) -> str:
    """`model.checkpoint` as the folder or hub id it names (a node that builds one, built)."""
    node = cfg.model.checkpoint
    return str(instantiate(node) if OmegaConf.is_config(node) else node)


def server_sampling(cfg: DictConfig) -> SamplingSettings:
    """The rollout's lengths as the servers need them (the longest prompt and trajectory)."""
    return SamplingSettings.from_config(cfg.rollout, None, False, max_turns(cfg))


def server_args(cfg: DictConfig, checkpoint: str, transfer: str = "files") -> dict[str, Any]:
    """The settings of a server's engine, from the config as the colocated engine takes them,
    split over `tensor_parallel_size` devices, taking whole weights by `transfer` (files, or a
    backend of vLLM's weight-transfer API: `grpo.rollout.vllm_transfer`)."""
    vllm = cfg.rollout.vllm
    adapters = cfg.model.lora.enabled and vllm.lora_sync == "adapter"
    args = engine_args(
        checkpoint,
        cfg.model.dtype,
        server_sampling(cfg),
        kv_cache_gib=vllm.kv_cache_gib,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        enforce_eager=vllm.enforce_eager,
        lora_rank=cfg.model.lora.r if adapters else None,
    )
    args["tensor_parallel_size"] = vllm.tensor_parallel_size
    if transfer in BACKENDS:
        args["weight_transfer_config"] = transfer_config(transfer)
    return args


@contextlib.contextmanager
def rollout_servers(cfg: DictConfig, run_dir: Path) -> Iterator[list[str] | None]:
    """The run's vLLM servers up and serving the config's model (see the module docstring):
    their addresses; None unless `rollout.vllm.mode=server`."""
    vllm = cfg.rollout.vllm
    if cfg.rollout.backend != "vllm" or vllm.mode != VLLMMode.server:
        yield None
        return
    checkpoint = checkpoint_folder(cfg)
    wanted = server_addresses(OmegaConf.to_container(vllm, resolve=True)["servers"])
    # what each server runs, started here or checked
    args = server_args(cfg, checkpoint, weight_transfer(cfg))
    with contextlib.ExitStack() as stack:
        addresses = wanted
        if isinstance(wanted, int):  # auto or a count: ours to start and stop
            addresses = start_servers(stack, cfg, args, wanted, Path(run_dir) / "servers")
        tokenizer = load_tokenizer(checkpoint)
        for address in addresses:
            try:
                check_server(
                    address, args, tokenizer, vllm.connect_timeout_s, vllm.request_timeout_s
                )
            except (BackendLost, ValueError) as error:
                raise ConfigError(f"rollout.vllm.servers: {error}") from None
        yield list(addresses)


def _die_with_parent() -> None:
    """In a started server, before it runs: SIGTERM when the trainer dies, even by SIGKILL."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_servers(
    stack: contextlib.ExitStack, cfg: DictConfig, args: dict[str, Any], count: int, log_dir: Path
) -> list[str]:
    """`count` vLLM servers on this machine running the engine settings `args`
    (`server_args`), on free ports, each stopped when `stack` closes; their addresses once all
    answer `/health` (within `rollout.vllm.start_timeout_s`, else one line with the server's
    log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for _ in range(count):
        port = free_port()
        log = log_dir / f"server-{port}.log"
        argv = server_command(args, "127.0.0.1", port)
        with log.open("w") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=server_env(args),
                preexec_fn=_die_with_parent,
                start_new_session=True,  # the terminal's Ctrl-C and SLURM's signals are ours
            )
        stack.callback(stop, process)
        started.append((f"127.0.0.1:{port}", process, log))
    timeout = cfg.rollout.vllm.start_timeout_s
    for address, process, log in started:
        try:
            wait_until_healthy(address, timeout, alive=lambda p=process: p.poll() is None)
        except BackendLost:
            how = "exited" if process.poll() is not None else f"did not come up in {timeout:g} s"
            why = f"the server started at {address} {how}; see {log}"
            raise ConfigError(f"rollout.vllm.servers: {why}") from None
    return [address for address, _, _ in started]


def stop(process: subprocess.Popen) -> None:
    """Stop a started server: SIGTERM, then SIGKILL to its process group (the API process and
    its engine process) after `STOP_WAIT_S`."""
    process.terminate()
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
