"""Generation by vLLM servers (`rollout.backend=vllm rollout.vllm.mode=server`): the client
backend, the checks a server passes before training, and the command that starts one.

A server is vLLM's own OpenAI-compatible server, `python -m vllm.entrypoints.openai.api_server`
(`vllm serve` fails with the CPU wheel, which lacks the `vllm` package metadata), started with
`VLLM_SERVER_DEV_MODE=1` for its RL endpoints (`/pause`, `/resume`, `/collective_rpc`) and with
the engine settings of the colocated engine: `server_command` turns
`grpo.rollout.vllm_engine.engine_args` into its flags, so model, tokenizer, dtype, length limits,
log-probs and the regex stop rule cannot drift. `python -m grpo.serve` starts one from the
training config; `rollout.vllm.servers=auto` has the trainer start its own (`grpo.run.servers`).

`VLLMServerBackend` is the client. `generate` sends one `/v1/completions` request per prompt:
its token ids and the colocated engine's sampling fields (`sampling_requests`: n = G, one seed
per prompt from torch's generator, the stop regex in `vllm_xargs`), `logprobs=0` (the sampled
token's log-prob) and `return_token_ids`. Prompts go to the servers in turn (data parallel), all
at once from threads; the answers become the `Rollout` the colocated engine would give
(`finished_completions`, `to_rollout`).

`sync` hands the weights over as files: `write_weights` writes them (`hf_weights`: LoRA merged)
as safetensors into a folder renamed into place once whole; then each server pauses
(`/pause?mode=wait`: requests in flight finish, new ones wait), loads the folder
(`/collective_rpc` `reload_weights`) and resumes, so no request is served with half-updated
weights; the previous folder is then removed. LoRA with `lora_sync="adapter"` (the default): the
servers run with vLLM's LoRA support (`engine_args`), the first sync loads the policy's base
weights, and each later one writes only the adapter (`write_adapter`) and, paused, has every
server load it under a new name (`/v1/load_lora_adapter`, `policy-vN`; the previous name is
unloaded), which requests then name; while the adapters are disabled they name the base.
Whole weights take the file handoff on a CPU; on CUDA, with `weight_transfer` nccl (servers on
GPUs of their own) or ipc (a server on the trainer's GPU), vLLM's weight-transfer API
(`grpo.rollout.vllm_transfer`), one server at a time, each paused meanwhile. Adapters always go
as files. Servers on other hosts need `weights_dir` on a file system they share.

Faults: `check_server` refuses a server that does not answer `/health` in time, serves another
model or tokenizer, has room for fewer tokens than the config's prompts and completions, lacks the
RL endpoints, or runs other engine settings (dtype, log-probs mode, stop rule, LoRA rank). A server
that stops answering mid-run (connection refused or reset, or no answer in `request_timeout_s`)
raises `BackendLost` naming its address.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo.batch import Rollout
from grpo.model.loading import Policy
from grpo.rollout import vllm_transfer
from grpo.rollout.base import Backend, BackendLost
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.vllm_adapters import adapters_active, write_adapter
from grpo.rollout.vllm_engine import (
    finished_completions,
    hf_weights,
    sampling_requests,
    to_rollout,
)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# A text the server's tokenizer must split into the same token ids as the config's.
TOKENIZER_PROBE = "Tokenizer check: 12 + 345 = 357, so the answer is\n#### 357"
HANDOFF_PREFIX = "grpo-weights-"  # the folder the weights pass through, one per trainer
MAX_THREADS = 64  # requests in flight at once (vLLM batches them)


def request(address: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
    """The answer of the server at `address` (host:port) to `path` (JSON read, other text as
    it is): a POST of `body` as JSON, a GET when it is None. `BackendLost` when the server
    cannot be reached or does not answer within `timeout` seconds; RuntimeError with its
    message for an error answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"http://{address}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            text, kind = answer.read(), answer.headers.get_content_type()
    except urllib.error.HTTPError as error:
        detail = " ".join(error.read().decode(errors="replace").split())[:300]
        line = f"rollout server {address}{path}: HTTP {error.code}: {detail}"
        if error.code >= 500:  # the server is up but its engine failed: lost all the same
            raise BackendLost(line) from None
        raise RuntimeError(line) from None
    except (OSError, http.client.HTTPException) as error:  # refused, reset, closed, timed out
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise BackendLost(f"rollout server {address}: {reason}") from None
    if kind != "application/json":  # e.g. the adapter endpoints' plain-text answers
        return text.decode(errors="replace")
    return json.loads(text) if text else None


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port no one listens on at `address` now (the system's pick)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def wait_until_healthy(
    address: str, timeout_s: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Wait until the server at `address` answers `/health`; `BackendLost` once `timeout_s`
    seconds have passed or `alive()` turns false (a server process that exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            request(address, "/health", None, timeout=max(0.5, min(5.0, timeout_s)))
            return
        except (BackendLost, RuntimeError) as error:  # not listening yet, or still loading
            if time.monotonic() >= deadline or not alive():
                raise BackendLost(f"{error} (waited {timeout_s:g} s for /health)") from None
        time.sleep(0.5)


def check_server(
    address: str,
    args: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    timeout_s: float,
    request_timeout_s: float,
) -> None:
    """Refuse, with one line (ValueError), a server at `address` that does not run the engine
    settings `args` (`engine_args` from the training config): another model than `model`,
    another tokenizer than `tokenizer`, room for fewer than `max_model_len` tokens, no RL
    endpoints (started without VLLM_SERVER_DEV_MODE=1), or, read from its config
    (`/server_info`), another dtype or log-probs mode, no regex stop rule, or no LoRA support
    for an adapter of rank `max_lora_rank`; `BackendLost` when it does not answer `/health`
    within `timeout_s`, or a check's request within `request_timeout_s` (a server's first
    `/server_info` gathers its system facts: seconds on a busy machine)."""
    checkpoint = args["model"]
    wait_until_healthy(address, timeout_s)
    answer = request(address, "/v1/models", None, request_timeout_s)["data"]
    models = [m for m in answer if not m.get("parent")]  # LoRA adapters name their base
    served = sorted({m["id"] for m in models} | {m.get("root") or m["id"] for m in models})
    if served != [checkpoint]:
        raise ValueError(f"{address} serves {', '.join(served)}, not the config's {checkpoint}")
    room = models[0].get("max_model_len")
    if room is not None and room < args["max_model_len"]:
        raise ValueError(
            f"{address} has room for {room} tokens; the config's longest prompt and "
            f"completion take {args['max_model_len']}"
        )
    probe = {"model": checkpoint, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
    tokens = request(address, "/tokenize", probe, request_timeout_s)["tokens"]
    if tokens != tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids:
        raise ValueError(f"{address} tokenizes text unlike the config's tokenizer ({checkpoint})")
    try:
        request(address, "/is_paused", None, request_timeout_s)
    except RuntimeError:
        raise ValueError(
            f"{address} has no /pause, /resume, /collective_rpc for the weight sync: start it "
            "with VLLM_SERVER_DEV_MODE=1 (python -m grpo.serve does)"
        ) from None
    config = request(address, "/server_info?config_format=json", None, request_timeout_s)[
        "vllm_config"
    ]
    problems = engine_differences(config, args)
    if problems:
        why = "; ".join(problems)
        raise ValueError(f"{address} {why}: start it with python -m grpo.serve and this config")


def engine_differences(config: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """What a server's engine config (vLLM's `/server_info` JSON) lacks of `args`, a phrase
    each: the dtype, the log-probs mode, the regex stop rule, the weight-transfer backend, LoRA
    for an adapter's rank."""
    model, lora = config["model_config"], config.get("lora_config")
    problems = []
    dtype = str(model["dtype"]).removeprefix("torch.")
    if dtype != args["dtype"]:
        problems.append(f"computes in {dtype}, the policy in {args['dtype']} (model.dtype)")
    if model["logprobs_mode"] != args["logprobs_mode"]:
        problems.append(f"returns {model['logprobs_mode']}, not {args['logprobs_mode']}")
    missing = set(args["logits_processors"]) - set(model.get("logits_processors") or [])
    if missing:
        problems.append(f"lacks the stop rule's logits processor {', '.join(sorted(missing))}")
    wanted = json.loads(args.get("weight_transfer_config", "null"))
    transfer = config.get("weight_transfer_config")
    if wanted is not None and (transfer or {}).get("backend") != wanted["backend"]:
        has = "no weight transfer" if transfer is None else f"weight transfer {transfer['backend']}"
        problems.append(
            f"has {has}, not {wanted['backend']} (rollout.vllm.weight_transfer; or files)"
        )
    rank = args.get("max_lora_rank")
    if rank is not None and (lora is None or lora["max_lora_rank"] < rank):
        has = "no LoRA support" if lora is None else f"LoRA up to rank {lora['max_lora_rank']}"
        problems.append(
            f"has {has}; the adapter sync needs rank {rank} (model.lora.r; or "
            "rollout.vllm.lora_sync=merged)"
        )
    return problems


def server_command(args: dict[str, Any], host: str, port: int) -> list[str]:
    """The command that runs vLLM's OpenAI server on `host:port` with the engine settings
    `args` (`engine_args`) as its flags (booleans as `--flag` / `--no-flag`)."""
    argv = [sys.executable, "-m", SERVER_MODULE, "--host", host, "--port", str(port)]
    for key, value in args.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list | tuple):
            argv += [f"--{flag}", *map(str, value)]
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def server_env(args: dict[str, Any]) -> dict[str, str]:
    """The environment of a server running the engine settings `args`: this process's, with the
    RL endpoints on (VLLM_SERVER_DEV_MODE=1), adapters loaded at run time
    (VLLM_ALLOW_RUNTIME_LORA_UPDATING), IPC weight transfer's pickled handles accepted
    (VLLM_ALLOW_INSECURE_SERIALIZATION, for `weight_transfer=ipc` only), grpo importable (the
    stop rule's logits processor), the engine in its own process, and no VLLM_CPU_KVCACHE_SPACE
    (it would override `kv_cache_gib`)."""
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    if args.get("weight_transfer_config") == vllm_transfer.transfer_config("ipc"):
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        env.pop(name, None)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the grpo package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def write_weights(model: PreTrainedModel, folder: Path, merged: bool = True) -> Path:
    """Write `model`'s weights as the checkpoint names them (`hf_weights`: LoRA merged, or the
    base alone) into `folder/model.safetensors`, the form the servers' `reload_weights` reads:
    written in a hidden folder beside it and renamed to `folder` once whole."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    tmp.mkdir(parents=True)
    tensors, stored = {}, set()
    for name, tensor in hf_weights(model, merged=merged):
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in stored:  # a tied weight: safetensors stores each tensor once
            tensor = tensor.clone()
        stored.add(tensor.data_ptr())
        tensors[name] = tensor
    save_file(tensors, tmp / "model.safetensors")
    os.replace(tmp, folder)
    return folder


class VLLMServerBackend(Backend):
    """The client of vLLM servers at `servers` (host:port each), which serve the policy's
    checkpoint (see the module docstring). Weights pass through a folder under `weights_dir`
    (null: the system's temporary folder), removed with the backend."""

    def __init__(
        self,
        policy: Policy,
        settings: SamplingSettings,
        *,
        servers: Sequence[str],
        request_timeout_s: float = 600.0,
        weights_dir: str | None = None,
        lora_sync: str = "adapter",
        weight_transfer: str = "files",
    ) -> None:
        super().__init__(policy, settings)
        self.servers, self.timeout = list(servers), request_timeout_s
        self.checkpoint = policy.checkpoint  # what the servers were checked to serve
        self.model_name = self.checkpoint  # what requests name: the base or an adapter version
        self.as_adapters = policy.uses_lora and lora_sync == "adapter"
        self.base_loaded = False
        root = Path(weights_dir).expanduser() if weights_dir else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self.handoff = Path(tempfile.mkdtemp(prefix=HANDOFF_PREFIX, dir=root))
        weakref.finalize(self, shutil.rmtree, self.handoff, ignore_errors=True)
        self.version = 0  # weight versions sent so far
        self.transfer = weight_transfer  # files | nccl | ipc (`grpo.rollout.vllm_transfer`)
        self.senders: dict[str, Any] = {}  # address: its `vllm_transfer.Sender`, made at first
        self.source: Any = None  # what the senders read: the policy's weights
        self.send_lock = threading.Lock()

    def _each(self, call: Callable[..., Any], *args: Sequence[Any]) -> list[Any]:
        """`call` on each tuple of `args`, all at once from threads; answers in order. The first
        failure is raised at once: the calls still queued are cancelled, not waited for."""
        pool = ThreadPoolExecutor(min(MAX_THREADS, len(args[0])))
        try:
            return list(pool.map(call, *args))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def sync(self, model: PreTrainedModel) -> float:
        """Hand `model`'s weights to every server (pause, reload, resume); with adapter sync the
        base weights the first time, then only its adapter (none while the adapters are
        disabled: requests name the base). Returns the seconds it took, the writing included."""
        start = time.perf_counter()
        self.version += 1
        folder = self.handoff / f"v{self.version:06d}"
        if not self.base_loaded:  # once: no adapter of an earlier trainer stays loaded
            self._on_every_server(self._unload_stale_adapters, None)
        if not self.as_adapters or not self.base_loaded:
            self._send_weights(model, folder, merged=not self.as_adapters)
            self.base_loaded = True
        if self.as_adapters:
            name = self.checkpoint
            if adapters_active(model):
                # A new name and folder per version; the handoff folder's unique part keeps
                # names apart over trainers that share a server (a resumed run, a second run).
                trainer = self.handoff.name.removeprefix(HANDOFF_PREFIX)
                name = f"policy-{trainer}-v{self.version}"
                write_adapter(model, folder)
            self._on_every_server(self._swap_adapter, name)
            self.model_name = name
        shutil.rmtree(self.handoff / f"v{self.version - 1:06d}", ignore_errors=True)
        return time.perf_counter() - start

    def _send_weights(self, model: PreTrainedModel, folder: Path, merged: bool) -> None:
        """Every server loads `model`'s whole weights (`hf_weights`: LoRA merged, or the base
        alone), through `folder` or `vllm_transfer`."""
        if self.transfer == "files":
            write_weights(model, folder, merged=merged)
            self._on_every_server(self._reload_weights, folder)
            return
        if not self.senders:  # made once (NCCL: the servers' workers join a group each)
            self.source = vllm_transfer.checkpoint_source(model)
            self.senders = {
                address: vllm_transfer.Sender(address, self.source, self.timeout, self.transfer)
                for address in self.servers
            }
            weakref.finalize(
                self, lambda senders=self.senders: [s.close() for s in senders.values()]
            )
        self.source.merged = merged
        self._on_every_server(self._transfer_weights, None)

    def _transfer_weights(self, address: str, _: Any = None) -> None:
        """Server `address` loads the weights its sender hands over; one server at a time (the
        trainer's GPU takes part in each)."""
        with self.send_lock:
            self.senders[address].send()

    def _on_every_server(self, change: Callable[[str, Any], None], arg: Any) -> None:
        """`change(address, arg)` on every server at once, each paused meanwhile."""
        count = len(self.servers)
        self._each(self._paused, self.servers, [change] * count, [arg] * count)

    def _paused(self, address: str, change: Callable[[str, Any], None], arg: Any) -> None:
        """`change(address, arg)` while server `address` is paused (`/pause?mode=wait`:
        requests in flight finish, new ones wait): no request sees half of it."""
        request(address, "/pause?mode=wait", {}, self.timeout)
        try:
            change(address, arg)
        finally:
            request(address, "/resume", {}, self.timeout)

    def _reload_weights(self, address: str, folder: Path) -> None:
        """Server `address` loads the weights in `folder` (the worker's `reload_weights`)."""
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
        request(address, "/collective_rpc", rpc, self.timeout)

    def _unload_stale_adapters(self, address: str, _: Any = None) -> None:
        """Server `address` drops the adapters an earlier trainer left loaded (first sync)."""
        for model in request(address, "/v1/models", None, self.timeout)["data"]:
            if model.get("parent"):  # a LoRA adapter names its base
                body = {"lora_name": model["id"]}
                request(address, "/v1/unload_lora_adapter", body, self.timeout)

    def _swap_adapter(self, address: str, name: str) -> None:
        """Server `address` drops the adapter requests named so far and, unless `name` is the
        base, loads adapter `name` from this version's folder (the engine holds one adapter:
        loading the new one evicts the old from its cache)."""
        if self.model_name != self.checkpoint:
            request(
                address, "/v1/unload_lora_adapter", {"lora_name": self.model_name}, self.timeout
            )
        if name != self.checkpoint:
            folder = str(self.handoff / f"v{self.version:06d}")
            body = {"lora_name": name, "lora_path": folder}
            request(address, "/v1/load_lora_adapter", body, self.timeout)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        settings: SamplingSettings,
    ) -> Rollout:
        bodies = []
        for ids, fields in sampling_requests(prompt_ids, prompt_mask, n, settings):
            extra = fields.pop("extra_args")
            body = {"model": self.model_name, "prompt": ids, **fields, "return_token_ids": True}
            bodies.append(body | ({"vllm_xargs": extra} if extra else {}))
        servers = [self.servers[i % len(self.servers)] for i in range(len(bodies))]
        paths = ["/v1/completions"] * len(bodies)
        answers = self._each(request, servers, paths, bodies, [self.timeout] * len(bodies))
        samples = [
            (c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"])
            for answer in answers
            for c in sorted(answer["choices"], key=lambda c: c["index"])
        ]
        completions = finished_completions(self.tokenizer, settings, samples)
        return to_rollout(self.tokenizer, prompt_ids, prompt_mask, n, completions)
