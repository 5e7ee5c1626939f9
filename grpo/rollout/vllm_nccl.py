"""Weights to vLLM servers by NCCL (`rollout.vllm.weight_transfer=nccl`, CUDA only).

The trainer broadcasts the policy's weights from its GPU straight into the GPUs of each server,
through vLLM's own weight-transfer API: the server runs with `--weight-transfer-config
{"backend": "nccl"}` (`python -m grpo.serve` on a GPU adds it) and its RL routes
(`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`), which vLLM's `NCCLTrainerWeightTransferEngine` drives over HTTP
(`HTTPVLLMWeightSyncClient`). One NCCL group per server: the trainer is rank 0, the server's
workers (tensor parallel) ranks 1.., met at a TCP store on this host's address as the server
sees it (`trainer_address`) and a free port. Weights go as `hf_weights` gives them (the
checkpoint's names, LoRA merged or the base alone), packed into vLLM's broadcast buffers, and
the server loads them with its layerwise reload, as `reload_weights` loads files.

Faults: an HTTP error of a server (unreachable, an engine error) raises `BackendLost` naming it,
as the file handoff does; a server that dies inside a broadcast can leave NCCL waiting, since
vLLM's communicator has no timeout.

NCCL cannot put two ranks of a group on one GPU, so a server must have GPUs of its own (a server
the trainer starts itself, `servers=auto`, shares the trainer's: it takes the file handoff). TRL's
`vllm-serve` (PyNccl over a stateless process group), prime-rl's NCCL broadcast and OpenRLHF
send weights to their servers the same way.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from grpo.rollout.base import BackendLost
from grpo.rollout.vllm_engine import hf_weights

NCCL_BACKEND = '{"backend": "nccl"}'  # the server's --weight-transfer-config


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


class NcclSender:
    """The NCCL weight transfer to one server at `address` (host:port): its group is made at
    construction (the server's workers join it), `send` broadcasts `source`'s weights into it.
    The caller pauses the server around `send`. Failures raise `BackendLost` naming the server."""

    def __init__(self, address: str, source: Any, timeout_s: float) -> None:
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from grpo.rollout.vllm_server import free_port, request

        self.address = address
        workers = request(address, "/get_world_size", None, timeout_s)["world_size"]
        host = trainer_address(address)
        info = NCCLTrainerInitInfo(
            master_address=host, master_port=free_port(host), world_size=1 + int(workers)
        )
        client = HTTPVLLMWeightSyncClient(f"http://{address}", timeout=timeout_s)
        self.engine = self._guarded(
            NCCLTrainerWeightTransferEngine.trainer_init, info, client=client, source=source
        )

    def send(self) -> None:
        """Broadcast the source's weights; the server loads them before this returns."""
        self._guarded(self.engine.send_weights)

    def close(self) -> None:
        self.engine.shutdown()

    def _guarded(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return call(*args, **kwargs)
        except requests.RequestException as error:
            raise BackendLost(
                f"rollout server {self.address}: NCCL weight transfer: {error}"
            ) from None
