"""LoRA adapters handed to vLLM as adapters (`rollout.vllm.lora_sync=adapter`), not merged.

vLLM serves a LoRA adapter from a folder in peft's format: `adapter_model.safetensors` (the
A and B matrices, peft's names) and `adapter_config.json` (rank, alpha, target modules).
`write_adapter` writes the policy's active adapter as such a folder and needs no engine (the
server mode hands the same folder to `/v1/load_lora_adapter`). `AdapterVersions` keeps one
in-process engine on the newest version: each `update` writes a new folder, registers it under
a new id (vLLM keeps the weights of an id it has loaded, so an id is never reused), and removes
the previous version from the engine and from disk. The folders live in shared memory
(`/dev/shm`) where there is one.

vLLM 0.32 has no public way to load an adapter from tensors in memory (`LoRARequest` takes a
path; building a `LoRAModel` inside the worker would reach into its private LoRA manager), and
writing the folder takes ~25 ms for SmolLM2's r16 adapter (7.4 MB) on 2 busy cores, so the
folder it is (docs/performance.md, section 15).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

# The ranks vLLM 0.32 can be built for (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_rank(rank: int) -> int:
    """The smallest rank vLLM can be built for (`max_lora_rank`) that holds `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {LORA_RANKS[-1]}")


def adapter_rank(model: PreTrainedModel) -> int:
    """The largest rank of the peft model's active adapter (its rank pattern included)."""
    config = model.peft_config[model.active_adapter]
    return max([config.r, *config.rank_pattern.values()])


def adapters_active(model: PreTrainedModel) -> bool:
    """Whether `model` has LoRA layers that are switched on (not under `disable_adapter()`)."""
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight")]
    return any(not layer.disable_adapters for layer in layers)


def adapter_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The active adapter's LoRA weights under the names peft saves them by (the adapter's name
    dropped), as `peft.get_peft_model_state_dict` gives them for LoRA, read from the parameters
    alone (that function walks the whole state dict: 40 ms of SmolLM2's 80 ms sync)."""
    tag = f".{model.active_adapter}"
    return {
        name.replace(tag, ""): p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if "lora_" in name and tag in name
    }


def write_adapter(model: PreTrainedModel, folder: str | Path) -> str:
    """Write `model`'s active LoRA adapter to `folder` in peft's format (safetensors weights,
    adapter_config.json), which vLLM loads; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_weights(model), folder / "adapter_model.safetensors")
    config = copy.copy(model.peft_config[model.active_adapter])
    config.inference_mode = True  # as peft's save_pretrained marks a saved adapter
    config.save_pretrained(str(folder))
    return str(folder)


def _scratch_root() -> str:
    """A fresh folder for adapter versions, in shared memory where there is one."""
    shm = Path("/dev/shm")
    return tempfile.mkdtemp(prefix="grpo-lora-", dir=shm if shm.is_dir() else None)


class AdapterVersions:
    """The adapter versions of one in-process engine (`vllm.LLM.llm_engine`): `request` is the
    `LoRARequest` of the newest one, or None while the policy's adapters are off."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.version, self.request = engine, 0, None
        self.root = _scratch_root()
        weakref.finalize(self, shutil.rmtree, self.root, True)

    @torch.no_grad()
    def update(self, model: PreTrainedModel) -> Any:
        """Hand the engine `model`'s current adapter as a new version (none while its adapters
        are disabled) and release the previous one; returns the new `request`."""
        from vllm.lora.request import LoRARequest

        old, self.request = self.request, None
        if old is not None:
            self.engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        if adapters_active(model):
            self.version += 1
            n = self.version
            folder = write_adapter(model, Path(self.root) / f"v{n}")
            self.request = LoRARequest(lora_name=f"policy-v{n}", lora_int_id=n, lora_path=folder)
            self.engine.add_lora(self.request)
        return self.request
