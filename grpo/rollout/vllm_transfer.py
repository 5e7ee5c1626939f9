"""Whole weights to vLLM servers on GPUs, through vLLM's weight-transfer API
(`rollout.vllm.weight_transfer=nccl|ipc`, CUDA only).

The server runs with `--weight-transfer-config {"backend": ...}` (`transfer_config`; `python -m
grpo.serve` on a GPU and the servers the trainer starts add it) and its RL routes
(`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`), which vLLM's trainer-side engines drive over HTTP
(`HTTPVLLMWeightSyncClient`):
- nccl, a server on GPUs of its own: one NCCL group per server, the trainer rank 0 and the
  server's workers (tensor parallel) ranks 1.., met at a TCP store on this host's address as the
  server sees it (`trainer_address`) and a free port; the weights are broadcast from the
  trainer's GPU (`NCCLTrainerWeightTransferEngine`). TRL's `vllm-serve` (PyNccl over a stateless
  process group), prime-rl's NCCL broadcast and OpenRLHF send weights to servers the same way.
- ipc, a server on the trainer's GPU (NCCL cannot put two ranks of a group on one GPU): the
  server maps the trainer's CUDA buffers through IPC handles, sent pickled over HTTP, which the
  server accepts with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (`server_env` sets it for ipc)
  (`IPCTrainerWeightTransferEngine`; verl's and TRL's colocated engines share memory likewise).
Both send the weights as `hf_weights` gives them (the checkpoint's names, LoRA merged or the
base alone) in packed buffers of bounded size, and the server loads them with its layerwise
reload, as `reload_weights` loads files.

Faults: an HTTP error of a server (unreachable, an engine error) raises `BackendLost` naming it,
as the file handoff does; a server that dies inside an NCCL broadcast can leave it waiting, since
vLLM's communicator has no timeout.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from grpo.rollout.base import BackendLost
from grpo.rollout.vllm_engine import hf_weights

BACKENDS = ("nccl", "ipc")  # the transfers of this module; `files` is vllm_server's handoff


def transfer_config(backend: str) -> str:
    """The server's `--weight-transfer-config` for `backend`."""
    return json.dumps({"backend": backend})


def trainer_address(server: str) -> str:
    """This host's address on the route to `server` (host:port): where the server's workers
    find the trainer's TCP store (no packet is sent)."""
    host, _, port = server.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, int(port)))
        return probe.getsockname()[0]


def checkpoint_source(model: PreTrainedModel) -> Any:
    """A vLLM `WeightSource` over `model`'s weights as `hf_weights` names them; `merged` (an
    attribute, True at first) says whether active LoRA adapters are merged in. Its metadata
    (names, dtypes, shapes: the same either way) is read once, without merging."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class CheckpointSource(WeightSource):
        def __init__(self) -> None:
            self.merged = True
            self._meta = [
                ParamMeta(name, t.dtype, tuple(t.shape))
                for name, t in hf_weights(model, merged=False)
            ]

        def metadata(self) -> list[ParamMeta]:
            return self._meta

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in hf_weights(model, merged=self.merged):
                yield name, tensor.contiguous()

    return CheckpointSource()


class Sender:
    """The weight transfer `backend` (nccl | ipc) to one server at `address` (host:port), set up
    at construction (an NCCL group the server's workers join, or the IPC flag); `send` hands it
    `source`'s weights. The caller pauses the server around `send`. Failures raise `BackendLost`
    naming the server."""

    def __init__(self, address: str, source: Any, timeout_s: float, backend: str) -> None:
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.ipc_engine import (
            IPCTrainerInitInfo,
            IPCTrainerWeightTransferEngine,
        )
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from grpo.rollout.vllm_server import free_port, request

        self.address = address
        if backend == "nccl":
            workers = request(address, "/get_world_size", None, timeout_s)["world_size"]
            host = trainer_address(address)
            info = NCCLTrainerInitInfo(
                master_address=host, master_port=free_port(host), world_size=1 + int(workers)
            )
            engine = NCCLTrainerWeightTransferEngine
        else:
            info, engine = IPCTrainerInitInfo(packed=True), IPCTrainerWeightTransferEngine
        client = HTTPVLLMWeightSyncClient(f"http://{address}", timeout=timeout_s)
        self.engine = self._guarded(engine.trainer_init, info, client=client, source=source)

    def send(self) -> None:
        """Hand over the source's weights; the server has loaded them when this returns."""
        self._guarded(self.engine.send_weights)

    def close(self) -> None:
        self.engine.shutdown()

    def _guarded(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return call(*args, **kwargs)
        except requests.RequestException as error:
            why = f"rollout server {self.address}: weight transfer: {error}"
            raise BackendLost(why) from None
