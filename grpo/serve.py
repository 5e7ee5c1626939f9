"""A vLLM server from the training config:
`python -m grpo.serve [the run's overrides] [rollout.vllm.port=8000] [rollout.vllm.host=0.0.0.0]`.

It composes `conf/train.yaml` with the overrides `python -m grpo.train` takes, checks them,
resolves the model's checkpoint folder (building it where the config says so, as the trainer
does), and becomes vLLM's OpenAI server (`server_command`) on that folder with the colocated
engine's settings (`engine_args`: dtype, length limits, processed log-probs, the regex stop
rule, seed, no prefix cache, the KV cache size) and its RL endpoints on (VLLM_SERVER_DEV_MODE=1).
The trainer pointed at it (`rollout.backend=vllm rollout.vllm.mode=server
rollout.vllm.servers=[HOST:PORT]`, same overrides) checks at start that it serves the same
model, tokenizer and lengths. Run it on the GPUs it should use (`CUDA_VISIBLE_DEVICES`); Hydra
keeps its config in its own run folder.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from grpo.rollout import vllm_engine
from grpo.rollout.vllm_server import server_command, server_env
from grpo.run.config import (
    ConfigError,
    command_line,
    exit_on_config_error,
    validate_config,
    weight_transfer,
)
from grpo.run.servers import checkpoint_folder, server_args


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        if not vllm_engine.available():
            raise ConfigError("python -m grpo.serve needs vLLM: run `make install-vllm`")
        validate_config(cfg)
        vllm = cfg.rollout.vllm
        # a listed server of the trainer's: NCCL on a GPU (auto), unless the config says otherwise
        args = server_args(cfg, checkpoint_folder(cfg), weight_transfer(cfg, listed=True))
        argv = server_command(args, vllm.host, vllm.port)
    except Exception as error:
        exit_on_config_error(error)  # one line and exit code 2; any other error is raised
        raise
    print(" ".join(argv), file=sys.stderr, flush=True)
    os.execve(argv[0], argv, server_env(args))


if __name__ == "__main__":
    command_line(main)
