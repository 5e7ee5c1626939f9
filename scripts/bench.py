"""Speed benchmark against Hugging Face TRL: `python scripts/bench.py [--quick] [--install]`.

The same GRPO workload runs through this project (its real CLI, `python -m grpo.train`) and
through TRL's `GRPOTrainer` (pinned in requirements-bench.txt), alternating A B A B, each run
in a fresh process: 2 prompts x 4 completions per step, completions forced to full length
(min_new_tokens) so both sides generate the same tokens, fp32, kl_coef (beta) 0.04, the same
learning rate, AdamW (fused, betas 0.9/0.99) and loss (DeepSeekMath's aggregation, TRL's
loss_type="grpo"), no gradient checkpointing, torch threads pinned.

Figures per side: median step time after warm-up (and its range over repeats), completions/s,
generated tokens/s, peak RSS of the process, and the split of a step into generation, scoring
plus reference forward, and the policy update. Also: the machine's fp32 matmul ceiling and
memory bandwidth (a STREAM triad), each phase's physical floor on this machine with each side's
measured/floor ratio (scripts/floors.py), and how our step time grows with G x length.

`--quick` runs the tiny workload only (under 3 minutes); its last line reads
`ratio tiny completions/s ours/trl: X.XX`. `--micro-batches` compares our update with fixed
micro-batches and with `trainer.micro_batch_tokens` on one GSM8K rollout of varied lengths
(needs ../shared/data/gsm8k or GRPO_GSM8K_DIR). `--weight-sync` times vLLM's weight sync per
step for SmolLM2 + LoRA r16, the adapter alone against the merged weights
(`rollout.vllm.lora_sync`; needs vLLM). `--freed-memory` times the update alone with
`trainer.keep_freed_memory` on and off, alternated in one process. `--asynchronous` times our
step with generation ahead of training (`rollout.max_staleness` 0 and 1) against one vLLM server
the bench starts pinned to core 0, the trainer pinned to core 1 (as generation and training
would own their GPUs), beside the colocated synchronous step on both cores (SmolLM2 + LoRA;
`--quick`: the tiny model, a smoke test; needs vLLM and 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

from floors import Machine, Model, Step, phase_floors

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements-bench.txt"
TRL_VERSION = "1.16.0"
SEED = 42
LEARNING_RATE = 1e-5
KL_COEF = 0.04
NUM_TRAIN = 64  # training problems (arithmetic); the steps draw from them in a seeded order
# The LoRA rows' adapters, as conf/model/_shared/defaults.yaml sets ours: rank, adapted modules.
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Workload:
    """One benchmarked configuration; both sides run it with the same settings."""

    name: str
    model: str  # our model config group: tiny | smollm2_135m
    new_tokens: int  # completion length (forced)
    lora: bool = False
    prompts: int = 2  # prompts per step
    group: int = 4  # G, completions per prompt
    warmup: int = 2  # steps left out of the figures
    steps: int = 8  # measured steps
    micro_batch: int = 8  # ours: completions per forward/backward (memory vs. speed)
    share_prompts: bool = True  # ours: each prompt's pass shared by its G completions
    offload_reference: bool = False  # ours: the frozen reference waits in a file (full FT)
    backend: str = "lean"  # ours: rollout.backend (vllm: the engine in the process)
    vllm_mode: str = "colocate"  # ours, backend vllm: rollout.vllm.mode (server: servers=auto)
    micro_batch_tokens: int | None = None  # ours: update micro-batches by token budget
    # ours, vLLM + LoRA: rollout.vllm.lora_sync. merged: the CPU's faster choice (vLLM's CPU LoRA
    # path slows generation ~3.8x, docs/performance.md section 15), as the rows measured before
    # the project's default became `adapter` (the GPU's choice).
    lora_sync: str = "merged"

    @property
    def completions(self) -> int:
        return self.prompts * self.group


# Tiny: per-call overhead dominates, so one forward per micro-batch (no separate prompt pass)
# and the reference in memory. SmolLM2: prompts shared (~80 of ~145 tokens a row) and, for full
# fine-tuning, the reference offloaded, which makes room for micro-batches of 2.
TINY = Workload("tiny", "tiny", 32, steps=32, share_prompts=False)  # 32 steps: ~1 s a repeat
SMOLLM2 = Workload(
    "smollm2", "smollm2_135m", 64, warmup=1, steps=3, micro_batch=2, offload_reference=True
)
SMOLLM2_LORA = replace(
    SMOLLM2, name="smollm2-lora", lora=True, micro_batch=4, offload_reference=False
)
# vLLM rows (make install-vllm): our step with vLLM generating, the weight sync in the split.
SMOLLM2_VLLM = replace(SMOLLM2, name="smollm2-vllm", backend="vllm")
SMOLLM2_LORA_VLLM = replace(SMOLLM2_LORA, name="smollm2-lora-vllm", backend="vllm")
# The same with a vLLM server the trainer starts on the same cores (adapters through files).
SMOLLM2_LORA_VLLM_SERVER = replace(
    SMOLLM2_LORA_VLLM, name="smollm2-lora-vllm-server", vllm_mode="server"
)
# `--asynchronous`: the LoRA row against a vLLM server, adapters synced (as section 16 measured).
SMOLLM2_LORA_VLLM_ASYNC = replace(SMOLLM2_LORA_VLLM, lora_sync="adapter")
# `--asynchronous --quick`: the tiny model against a vLLM server (a smoke test of the placement).
TINY_VLLM_SERVER = replace(TINY, name="tiny-vllm-server", backend="vllm", vllm_mode="server")
WORKLOADS = {
    w.name: w
    for w in (
        TINY,
        SMOLLM2,
        SMOLLM2_LORA,
        SMOLLM2_VLLM,
        SMOLLM2_LORA_VLLM,
        SMOLLM2_LORA_VLLM_SERVER,
    )
}
# `--micro-batches`: ours against ours, the update with fixed micro-batches vs a token budget of
# the same padded size, on GSM8K prompts whose completions (up to 256 tokens, ended by the `####`
# line or EOS, not forced) vary in length. TRL is not involved.
GSM8K_VARIED = replace(SMOLLM2_LORA, name="gsm8k-varied", new_tokens=256, group=8)
# Under --avx2 every worker runs with AVX2 kernels (the closest an AVX-512 machine gets to an
# AVX2-only one): ATen's CPU dispatch, MKL's and oneDNN's instruction sets.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
SCALING = [(g, t) for g in (4, 8) for t in (32, 64)]  # (G, completion length) on the tiny model


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process and writes a JSON result.


def model_folder(workload: Workload) -> str:
    """The checkpoint folder both sides load (built once, cached)."""
    from grpo.model.loading import smollm2_checkpoint, tiny_checkpoint
    from grpo.tasks.arithmetic import tokenizer_corpus

    cache = os.environ.get("GRPO_CACHE_DIR", "~/.cache/grpo")
    if workload.model == "tiny":
        return tiny_checkpoint(cache, tokenizer_corpus())
    return smollm2_checkpoint(cache)


def step_prompts(workload: Workload, use_chat_template: bool, tokenizer) -> list[dict[str, str]]:
    """The problems of every step, in our trainer's order (data seed 0, sampler seed SEED)."""
    from grpo.rollout.sampler import GroupedSampler
    from grpo.rollout.source import render_prompts
    from grpo.tasks.arithmetic import Arithmetic

    task = Arithmetic(num_train=NUM_TRAIN, num_test=0)
    sampler = GroupedSampler(NUM_TRAIN, workload.prompts, workload.group, seed=SEED)
    rows = [
        task.train[i]
        for _ in range(workload.warmup + workload.steps)
        for i in sampler.next_prompts()
    ]
    texts = render_prompts(tokenizer, task, rows, use_chat_template)
    return [{"prompt": t, "answer": r["answer"]} for t, r in zip(texts, rows, strict=True)]


def our_overrides(
    workload: Workload, threads: int, run_dir: str, extra: list[str] = ()
) -> list[str]:
    """Hydra overrides that make our CLI run `workload` (and nothing slow around it).

    Every setting that shapes the work is pinned here, so that changes of the project's
    defaults never change the benchmark.
    """
    t = workload.new_tokens
    return [
        "task=arithmetic",
        f"task.num_train={NUM_TRAIN}",
        "task.num_test=2",
        "task.stop_pattern=null",
        f"rollout.min_new_tokens={t}",
        f"model={workload.model}",
        f"model.lora.enabled={str(workload.lora).lower()}",
        "model.dtype=float32",
        "model.load_in_4bit=false",
        "model.gradient_checkpointing=false",
        "reward=correctness",
        f"seed={SEED}",
        f"algorithm.num_responses_per_prompt={workload.group}",
        f"algorithm.kl.coef={KL_COEF}",
        "algorithm.kl.estimator=k3",
        "algorithm.kl.in_reward=false",
        "algorithm/policy_loss=clip",
        "algorithm.policy_loss.clip_ratio=0.2",
        "algorithm/advantage=grpo",
        "algorithm.update_epochs=1",
        "algorithm.num_mini_batches=1",
        "algorithm.mask_truncated=false",
        "algorithm.dynamic_sampling.enabled=false",
        "algorithm.reference_update.every=0",
        "algorithm.loss.aggregation=seq_mean_token_mean",
        "algorithm.loss.entropy_coef=0.0",
        "algorithm.loss.top_entropy_quantile=1.0",
        "trainer.device=cpu",
        f"trainer.batch_size={workload.prompts}",
        f"trainer.max_steps={workload.warmup + workload.steps}",
        f"trainer.learning_rate={LEARNING_RATE}",
        "trainer.optimizer.betas=[0.9,0.99]",
        "trainer.optimizer.weight_decay=0.0",
        "++trainer.optimizer.fused=true",  # TRL's default optimizer: adamw_torch_fused
        "trainer.scheduler.num_warmup_steps=0",
        "trainer.max_grad_norm=1.0",
        f"rollout.max_new_tokens={t}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        "rollout.max_prompt_length=256",
        f"trainer.micro_batch_size={workload.micro_batch}",
        f"trainer.micro_batch_tokens={workload.micro_batch_tokens or 'null'}",
        f"trainer.inference_batch_size={workload.completions}",  # no-grad passes: one, as TRL
        f"trainer.share_prompts={str(workload.share_prompts).lower()}",
        f"trainer.offload_reference={str(workload.offload_reference).lower()}",
        f"trainer.num_threads={threads}",
        f"rollout.backend={workload.backend}",
        f"rollout.vllm.mode={workload.vllm_mode}",
        f"rollout.vllm.lora_sync={workload.lora_sync}",
        "rollout.vllm.kv_cache_gib=0.1",
        "eval.heldout.max_new_tokens=4",
        "eval.heldout.num_samples=0",
        "eval.comparison.at_end=false",
        "logging.progress_bar=false",
        "logging.plots=false",
        "logging.samples_every=0",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run_ours(workload: Workload, threads: int, extra: list[str]) -> dict:
    """Our trainer through its CLI entry point (scoring is `time/reward_s` + `time/logprobs_s`,
    the no-grad reference pass, + `time/advantages_s`; `time/update_s` the policy forward,
    backward and optimiser step)."""
    import runpy

    with tempfile.TemporaryDirectory() as run_dir:
        sys.argv = ["grpo.train", *our_overrides(workload, threads, run_dir, extra)]
        runpy.run_module("grpo.train", run_name="__main__", alter_sys=True)
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [m for m in map(json.loads, lines) if "time/step_s" in m]
    measured = steps[workload.warmup :]
    sync = [m.get("time/weight_sync_s", 0.0) for m in measured]  # after the step's update
    return {
        "step_s": [m["time/step_s"] + s for m, s in zip(measured, sync, strict=True)],
        "generate_s": [m["time/generate_s"] for m in measured],
        "score_ref_s": [
            m["time/reward_s"] + m["time/logprobs_s"] + m["time/advantages_s"] for m in measured
        ],
        "update_s": [m["time/update_s"] for m in measured],
        "sync_s": sync,
        "mean_length": statistics.mean(m["completions/mean_length"] for m in measured),
    }


def run_trl(workload: Workload, threads: int) -> dict:
    """TRL's GRPOTrainer on the same problems, model folder and settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.model.loading import load_tokenizer
    from grpo.tasks.rewards import CorrectnessReward

    torch.set_num_threads(threads)
    folder = model_folder(workload)
    tokenizer = load_tokenizer(folder)
    chat = workload.model != "tiny"
    dataset = Dataset.from_list(step_prompts(workload, chat, tokenizer))
    correctness = CorrectnessReward(strict=False)

    def reward(prompts, completions, answer, completion_ids, **kwargs):
        return correctness(completions, answer, lengths=[len(c) for c in completion_ids]).total

    timings: dict[str, list[float]] = {"generate": [], "rollout": [], "step": []}

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            timings["generate"].append(time.perf_counter() - start)
            return out

        def _generate_and_score_completions(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kwargs)
            timings["rollout"].append(time.perf_counter() - start)
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings["step"].append(time.perf_counter() - self.start)

    t = workload.new_tokens
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=workload.completions,
            num_generations=workload.group,
            max_completion_length=t,
            generation_kwargs={"min_new_tokens": t},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=KL_COEF,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            adam_beta2=0.99,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=workload.warmup + workload.steps,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            model_init_kwargs={"dtype": "float32"},
            shuffle_dataset=False,
            seed=SEED,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        lora = None
        if workload.lora:
            targets = list(LORA_TARGETS)
            lora = LoraConfig(r=LORA_RANK, lora_alpha=32, lora_dropout=0.05, target_modules=targets)
        trainer = Timed(
            model=folder,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[StepClock()],
        )
        trainer.train()
    w = workload.warmup
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "loss" in h]
    rollout, generate = timings["rollout"][w:], timings["generate"][w:]
    return {
        "step_s": timings["step"][w:],
        "generate_s": generate,
        "score_ref_s": [r - g for r, g in zip(rollout, generate, strict=True)],
        "update_s": [s - r for s, r in zip(timings["step"][w:], rollout, strict=True)],
        "sync_s": [0.0] * len(rollout),
        "mean_length": statistics.mean(lengths[w:]),
    }


def run_machine(threads: int, size: int = 4096, repeats: int = 3) -> dict:
    """The machine's two limits: GFLOP/s of the best of `repeats` fp32 (size x size) @
    (size x size) products, and memory GB/s of the best of `repeats` STREAM triads
    (`triad_gbs`); the kernels torch dispatches to, and the lean decoder's product for streamed
    weights for the bench's 8 decoding rows (`products.streaming_product`)."""
    import torch

    from grpo.rollout import products

    torch.set_num_threads(threads)
    streaming = products.streaming_product(8)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {
        "gflops": 2 * size**3 / best / 1e9,
        "gbs": triad_gbs(repeats),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else "unknown",
        "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "(default: the best)"),
        "streaming": streaming.__name__ if streaming else "F.linear",
    }


def triad_gbs(repeats: int = 3, mib: int = 128) -> float:
    """Memory bandwidth, GB/s: the best of `repeats` STREAM triads a = b + 3 c on fp32 arrays
    of `mib` MiB each (3 x 128 MiB, far past any cache), counted as STREAM counts them: two
    arrays read and one written per element (a write's cache-line fill not counted)."""
    import torch

    n = mib * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    torch.add(b, c, alpha=3.0, out=a)  # warm-up: the pages are touched
    best = min(_timed(lambda: torch.add(b, c, alpha=3.0, out=a)) for _ in range(repeats))
    return 3 * 4 * n / best / 1e9


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_floor(workload: Workload) -> dict:
    """What `floors` needs of `workload`: its model's shape (`floors.Model`'s fields, from the
    config on the meta device) and the token count of each measured step's prompts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo.model.loading import load_tokenizer

    folder = model_folder(workload)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head counted once
    tied = head is embed
    adapter = 0
    if workload.lora:  # r (in + out) per adapted Linear
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
                adapter += LORA_RANK * (module.in_features + module.out_features)
    # vllm_engine.hf_weights: the checkpoint's tensors (LoRA merged in), and the head again when
    # tied; with rollout.vllm.lora_sync=adapter, the adapter alone after the first sync
    synced = adapter if workload.lora_sync == "adapter" and adapter else total + head.numel() * tied
    heads = config.num_attention_heads
    shape = {
        "body": total - embed.numel() - (0 if tied else head.numel()),
        "head": head.numel(),
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "trainable": adapter or total,
        "adapter": adapter,
        "synced": synced * (workload.backend == "vllm"),
    }
    tokenizer = load_tokenizer(folder)
    rows = step_prompts(workload, workload.model != "tiny", tokenizer)
    lengths = [len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rows]
    b = workload.prompts
    steps = [lengths[i : i + b] for i in range(workload.warmup * b, len(rows), b)]
    return {"model": shape, "prompts": steps}


def _policy_and_rollout(workload: Workload, threads: int):
    """Our policy (full fine-tuning) and a rollout of the first measured step's prompts."""
    import torch

    from grpo.model.loading import load_policy
    from grpo.rollout.lean import LeanBackend

    torch.set_num_threads(threads)
    chat = workload.model != "tiny"
    policy = load_policy(model_folder(workload), tokenizer={"use_chat_template": chat})
    rows = step_prompts(workload, chat, policy.tokenizer)[workload.warmup :][: workload.prompts]
    prompts = [r["prompt"] for r in rows]
    torch.manual_seed(SEED)
    rollout = _generate(LeanBackend, policy, prompts, workload)
    return policy, prompts, rollout


def _generate(backend, policy, prompts: list[str], workload: Workload):
    """The step's generation by `backend` (a class, or a built backend): G completions of
    each prompt forced to full length."""
    from grpo.rollout.settings import SamplingSettings
    from grpo.rollout.source import tokenize_prompts

    t = workload.new_tokens
    settings = SamplingSettings(t, max_prompt_length=256, min_new_tokens=t)
    if isinstance(backend, type):
        backend = backend(policy, settings)
    ids, mask = tokenize_prompts(policy.tokenizer, prompts, 256, policy.model.device)
    return backend.generate(ids, mask, workload.group, settings)


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def run_generation_pieces(workload: Workload, threads: int) -> dict:
    """`rollout.generate` with each backend, and the two samplers, on one step's prompts."""
    import torch

    from grpo.rollout import vllm_engine
    from grpo.rollout.backends import build_backend
    from grpo.rollout.lean import sample_token
    from grpo.rollout.settings import SamplingSettings

    policy, prompts, _ = _policy_and_rollout(workload, threads)
    repeats = 5 if workload.model == "tiny" else 2
    result = {}
    for name in ("transformers", "lean", "vllm"):
        if name == "vllm" and not vllm_engine.available():
            continue
        settings = SamplingSettings(workload.new_tokens, max_prompt_length=256)
        options = {"kv_cache_gib": 0.1} if name == "vllm" else {}
        backend = build_backend(name, policy, settings, options)
        result[name] = _median_time(
            lambda b=backend: _generate(b, policy, prompts, workload), repeats
        )
    probs = torch.softmax(torch.randn(workload.completions, policy.model.config.vocab_size), -1)
    result["multinomial"] = _median_time(lambda: torch.multinomial(probs, 1), 100)
    result["inverse_cdf"] = _median_time(lambda: sample_token(probs), 100)
    return result


def run_logprobs_piece(workload: Workload, threads: int, chunk: int | None, micro: int) -> dict:
    """One policy forward + backward over a step's completions, `micro` at a time."""
    from grpo.actor.logprobs import token_logprobs
    from grpo.batch import take

    policy, _, rollout = _policy_and_rollout(workload, threads)
    model = policy.model.train()

    def forward_backward():
        for start in range(0, workload.completions, micro):
            micro_batch = take(rollout, slice(start, start + micro))
            logp, _ = token_logprobs(model, micro_batch, with_entropy=True, chunk_logits=chunk)
            logp.sum().backward()
        model.zero_grad(set_to_none=True)

    return {"time": _median_time(forward_backward, 3)}


def lora_policy(workload: Workload):
    """Our policy with LoRA r16 (alpha 32) on q, k, v, o and no dropout, chat template on."""
    from grpo.model.loading import load_policy

    lora = {"enabled": True, "r": LORA_RANK, "alpha": 32, "dropout": 0.0}
    lora["target_modules"] = list(LORA_TARGETS)
    return load_policy(model_folder(workload), tokenizer={"use_chat_template": True}, lora=lora)


def run_update_piece(workload: Workload, threads: int, repeats: int = 3) -> dict:
    """`--micro-batches`, the update alone: SmolLM2 + LoRA r16, one seeded rollout of GSM8K-varied
    (the same tokens in every process), then the actor's update timed `repeats` times after a
    warm-up (lr 0: the same weights each time) with fixed micro-batches or a token budget."""
    import torch

    from grpo.actor.update import Actor, UpdateSettings
    from grpo.algorithm.loss import GRPOLoss
    from grpo.rollout.lean import LeanBackend
    from grpo.rollout.settings import SamplingSettings
    from grpo.rollout.source import render_prompts, tokenize_prompts
    from grpo.tasks.gsm8k import GSM8K

    torch.set_num_threads(threads)
    folder = os.environ.get("GRPO_GSM8K_DIR", str(REPO.parent / "shared" / "data" / "gsm8k"))
    task = GSM8K(path=folder, max_train_samples=NUM_TRAIN, max_test_samples=2)
    policy = lora_policy(workload)
    settings = SamplingSettings(workload.new_tokens, 256, stop_pattern=task.stop_pattern)
    prompts = render_prompts(policy.tokenizer, task, task.train[: workload.prompts], True)
    ids, mask = tokenize_prompts(policy.tokenizer, prompts, 256, "cpu")
    torch.manual_seed(SEED)
    rollout = LeanBackend(policy, settings).generate(ids, mask, workload.group, settings)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    update = UpdateSettings(1.0, workload.micro_batch, workload.micro_batch_tokens, 16, True, 1.0)
    actor = Actor(policy, None, GRPOLoss(kl={"coef": 0.0}), torch.optim.SGD(params, lr=0.0), update)
    advantages = torch.linspace(-1.0, 1.0, workload.completions)
    scores = actor.score(rollout)
    wall, _ = _median_time(lambda: actor.update(rollout, advantages, scores), repeats)
    lengths = rollout.lengths.tolist()
    return {"update_s": wall, "lengths": lengths}


def run_heap_piece(workload: Workload, threads: int, repeats: int) -> dict:
    """`--freed-memory`, the update alone with `trainer.keep_freed_memory` on and off, alternated
    `repeats` times in one process after a warm-up of each (the bench's first measured rollout,
    AdamW at lr 0: the same weights each time): seconds and page faults of each update."""
    import resource

    import torch

    from grpo.actor.update import Actor, UpdateSettings
    from grpo.algorithm.loss import GRPOLoss

    policy, _, rollout = _policy_and_rollout(workload, threads)
    if workload.lora:
        policy = lora_policy(workload)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.99), fused=True)
    advantages = torch.linspace(-1.0, 1.0, workload.completions)
    result = {"kept_s": [], "default_s": [], "kept_faults": [], "default_faults": []}

    def update(keep: bool) -> tuple[float, int]:
        settings = UpdateSettings(
            1.0, workload.micro_batch, None, 8, True, 1.0, keep_freed_memory=keep
        )
        actor = Actor(policy, None, GRPOLoss(kl={"coef": 0.0}), optimizer, settings)
        scores = actor.score(rollout)
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        actor.update(rollout, advantages, scores)
        seconds = time.perf_counter() - start
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    update(True), update(False)  # warm-up
    for _ in range(repeats):
        for keep, side in ((True, "kept"), (False, "default")):
            seconds, faults = update(keep)
            result[f"{side}_s"].append(seconds)
            result[f"{side}_faults"].append(faults)
    return result


def run_sync_piece(workload: Workload, threads: int, lora_sync: str, syncs: int = 5) -> dict:
    """`--weight-sync`: SmolLM2 + LoRA r16 in a vLLM engine (`rollout.vllm.lora_sync`); the
    seconds of `syncs` weight syncs after the engine's first (which loads the base weights),
    each after the adapter changed as a step changes it (small noise on every LoRA weight)."""
    import torch

    from grpo.rollout.backends import build_backend
    from grpo.rollout.settings import SamplingSettings

    torch.set_num_threads(threads)
    policy = lora_policy(workload)
    settings = SamplingSettings(workload.new_tokens, max_prompt_length=256)
    options = {"kv_cache_gib": 0.1, "lora_sync": lora_sync}
    backend = build_backend("vllm", policy, settings, options)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    times = []
    for _ in range(syncs):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=1e-3)
        times.append(backend.sync(policy.model))
    every = sum(p.numel() for p in policy.model.parameters())
    return {"sync_s": times, "adapter_params": sum(p.numel() for p in params), "params": every}


def worker(args: argparse.Namespace) -> None:
    """Run one measurement in this process and write its JSON to `args.out`."""
    workload = Workload(**json.loads(args.spec))
    if args.worker == "ours":
        result = run_ours(workload, args.threads, args.set)
    elif args.worker == "trl":
        result = run_trl(workload, args.threads)
    elif args.worker == "machine":
        result = run_machine(args.threads)
    elif args.worker == "generation":
        result = run_generation_pieces(workload, args.threads)
    elif args.worker == "update":
        result = run_update_piece(workload, args.threads)
    elif args.worker == "sync":
        result = run_sync_piece(workload, args.threads, args.set[0])
    elif args.worker == "heap":
        result = run_heap_piece(workload, args.threads, int(args.set[0]))
    elif args.worker == "logprobs":
        chunk, micro = json.loads(args.set[0])
        result = run_logprobs_piece(workload, args.threads, chunk, micro)
    else:
        result = run_floor(workload)
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver: runs workers, alternating sides, and prints the tables.


DISPATCH_ENV: dict[str, str] = {}  # AVX2_ENV under --avx2


def spawn(
    kind: str,
    workload: Workload,
    threads: int,
    extra: list[str] = (),
    cores: set[int] | None = None,
) -> dict:
    """Run a worker process; returns its result with `peak_rss_mb` (ru_maxrss of the process).

    `extra`: Hydra overrides added to our side's command line (ablations); `cores`: the CPUs it
    may run on (None: this process's).
    """
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_SILENT="true",
        WANDB_MODE="offline",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    env.update(DISPATCH_ENV)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", kind, "--spec", json.dumps(asdict(workload))]
        cmd += ["--threads", str(threads), "--out", out.name, *(f"--set={o}" for o in extra)]
        with tempfile.TemporaryFile() as log:
            pin = None if cores is None else lambda: os.sched_setaffinity(0, cores)
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-4000:]
                raise SystemExit(f"bench worker {' '.join(cmd[2:])} failed:\n{tail}")
        result = json.loads(Path(out.name).read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


@dataclass
class Summary:
    """Medians over repeats (each repeat: the median of its measured steps) and ranges."""

    step: float
    step_lo: float
    step_hi: float
    generate: float
    score_ref: float
    update: float
    sync: float
    rss: float
    mean_length: float


def summarise(runs: list[dict]) -> Summary:
    per_run = {k: [statistics.median(r[k]) for r in runs] for k in runs[0] if k.endswith("_s")}
    steps = per_run["step_s"]
    return Summary(
        step=statistics.median(steps),
        step_lo=min(steps),
        step_hi=max(steps),
        generate=statistics.median(per_run["generate_s"]),
        score_ref=statistics.median(per_run["score_ref_s"]),
        update=statistics.median(per_run["update_s"]),
        sync=statistics.median(per_run["sync_s"]),
        rss=statistics.median(r["peak_rss_mb"] for r in runs),
        mean_length=statistics.median(r["mean_length"] for r in runs),
    )


def load() -> float:
    return os.getloadavg()[0]


def compare(workload: Workload, repeats: int, threads: int, extra: list[str]) -> dict[str, Summary]:
    """Run ours and TRL alternately (A B A B ...), `repeats` times each."""
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(repeats):
        for side in ("ours", "trl"):
            before = load()
            runs[side].append(spawn(side, workload, threads, extra if side == "ours" else ()))
            step = statistics.median(runs[side][-1]["step_s"])
            print(
                f"  {workload.name} repeat {r + 1}/{repeats} {side:4}: step {step * 1e3:8.1f} ms"
                f"  (1-min load {before:.2f} -> {load():.2f})",
                flush=True,
            )
    return {side: summarise(side_runs) for side, side_runs in runs.items()}


HEADER = (
    f"{'workload':<38}{'side':<6}{'step ms (range)':>24}{'compl/s':>9}{'tok/s':>8}"
    f"{'gen ms':>9}{'score+ref':>10}{'update':>9}{'sync':>7}{'peak RSS MB':>12}"
)


def row(label: str, side: str, s: Summary, workload: Workload) -> str:
    completions = workload.completions / s.step
    spread = f"{s.step * 1e3:.1f} ({s.step_lo * 1e3:.1f}-{s.step_hi * 1e3:.1f})"
    return (
        f"{label:<38}{side:<6}{spread:>24}{completions:>9.1f}"
        f"{completions * s.mean_length:>8.0f}{s.generate * 1e3:>9.1f}{s.score_ref * 1e3:>10.1f}"
        f"{s.update * 1e3:>9.1f}{s.sync * 1e3:>7.0f}{s.rss:>12.0f}"
    )


def workload_floors(
    workload: Workload, threads: int, limits: Machine
) -> tuple[dict[str, float], str]:
    """`workload`'s phase floors in seconds (`floors.phase_floors`, the mean over its measured
    steps' prompts; every completion T tokens, as both sides force), and a line on what they
    count."""
    spec = spawn("floor", workload, threads)
    model, t = Model(**spec["model"]), workload.new_tokens
    # One no-gradient pass, the reference's: one optimiser step per batch needs no old log-probs.
    steps = [
        phase_floors(model, Step(tuple(p), (t,) * (len(p) * workload.group)), limits, forwards=1)
        for p in spec["prompts"]
    ]
    lengths = [n for p in spec["prompts"] for n in p]
    note = (
        f"N = {_count(model.body + model.head)} (layers {_count(model.body)} + LM head "
        f"{_count(model.head)}), {model.layers} layers, {model.heads} heads "
        f"({model.kv_heads} key/value) x {model.head_dim}; {workload.prompts} prompts of "
        f"{min(lengths)}-{max(lengths)} tokens a step, each shared by G={workload.group} "
        f"completions of {t}; AdamW over {_count(model.trainable)} parameters"
        + (f"; sync {_count(model.synced)} parameters" if model.synced else "")
    )
    return {k: statistics.mean(s[k] for s in steps) for k in steps[0]}, note


def _count(n: int) -> str:
    """A parameter count as 134.5M or 156.0k."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def floor_row(floor: dict[str, float], workload: Workload) -> str:
    """The floors in the table's columns (ms; completions/s and tokens/s at the floor)."""
    completions = workload.completions / floor["step"]
    return (
        f"{'  floor (physical minimum)':<44}{floor['step'] * 1e3:>24.1f}{completions:>9.1f}"
        f"{completions * workload.new_tokens:>8.0f}{floor['generate'] * 1e3:>9.1f}"
        f"{floor['score_ref'] * 1e3:>10.1f}{floor['update'] * 1e3:>9.1f}"
        f"{floor['sync'] * 1e3:>7.0f}"
    )


def ratio_row(side: str, s: Summary, floor: dict[str, float]) -> str:
    """Each measured phase over its floor, in the table's columns."""

    def times(measured: float, key: str) -> str:
        return f"{measured / floor[key]:.1f}x" if floor[key] else "-"

    return (
        f"{'  measured / floor':<38}{side:<6}{times(s.step, 'step'):>24}{'':>17}"
        f"{times(s.generate, 'generate'):>9}{times(s.score_ref, 'score_ref'):>10}"
        f"{times(s.update, 'update'):>9}{times(s.sync, 'sync'):>7}"
    )


def ensure_trl(install: bool) -> None:
    """Check that trl==TRL_VERSION is installed; install it (pinned, constrained) if asked."""
    try:
        if metadata.version("trl") == TRL_VERSION:
            return
    except metadata.PackageNotFoundError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]
    cmd += ["-c", str(REPO / "requirements.txt")]  # moves no pin of the project
    if not install:
        raise SystemExit(
            f"trl=={TRL_VERSION} is not installed; run `make bench` or {' '.join(cmd)}"
        )
    print(f"installing trl=={TRL_VERSION}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny workload only (< 3 minutes)")
    parser.add_argument("--install", action="store_true", help="pip install trl if missing")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats per side")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads"
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help=f"comma list of {list(WORKLOADS)} (default: all; the vllm ones when it is installed)",
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the G x length table")
    parser.add_argument(
        "--avx2",
        action="store_true",
        help="run both sides with AVX2 kernels: "
        + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()),
    )
    parser.add_argument(
        "--pieces",
        action="store_true",
        help="ablations of our pieces instead (generate backends, samplers, log-prob paths)",
    )
    parser.add_argument(
        "--micro-batches",
        action="store_true",
        help="ours only: fixed micro-batches vs trainer.micro_batch_tokens on GSM8K (needs "
        "../shared/data/gsm8k or GRPO_GSM8K_DIR)",
    )
    parser.add_argument(
        "--freed-memory",
        action="store_true",
        help="ours only: the update alone with trainer.keep_freed_memory on and off, alternated "
        "in one process (SmolLM2 full and + LoRA)",
    )
    parser.add_argument(
        "--weight-sync",
        action="store_true",
        help="ours only: vLLM weight-sync seconds per step, LoRA adapter vs merged (needs vLLM)",
    )
    parser.add_argument(
        "--asynchronous",
        action="store_true",
        help="ours only: rollout.max_staleness 0 vs 1, a vLLM server on core 0 and the trainer "
        "on core 1, beside the colocated 2-core step (needs vLLM; --quick: tiny smoke test)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override for our side only, e.g. trainer.micro_batch_size=8 (repeatable)",
    )
    # Worker mode (internal): run one measurement and write JSON.
    parser.add_argument(
        "--worker",
        choices=[
            "ours",
            "trl",
            "machine",
            "floor",
            "generation",
            "logprobs",
            "update",
            "sync",
            "heap",
        ],
    )
    parser.add_argument("--spec", help="the workload as JSON")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.avx2:
        DISPATCH_ENV.update(AVX2_ENV)
    from grpo.rollout.vllm_engine import available

    everything = [n for n, w in WORKLOADS.items() if available() or w.backend != "vllm"]
    names = ["tiny"] if args.quick else (args.workloads or ",".join(everything)).split(",")
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1")
    if args.pieces:
        pieces([WORKLOADS[n] for n in names if not WORKLOADS[n].lora], args.threads)
        return
    if args.micro_batches:
        micro_batch_modes(args.repeats, args.threads)
        return
    if args.freed_memory:
        freed_memory_modes(args.repeats, args.threads)
        return
    if args.weight_sync:
        if not available():
            raise SystemExit("--weight-sync needs vLLM: run `make install-vllm`")
        weight_sync_modes(args.repeats, args.threads)
        return
    if args.asynchronous:
        if not available() or len(os.sched_getaffinity(0)) < 2:
            raise SystemExit("--asynchronous needs vLLM (`make install-vllm`) and 2 cores")
        asynchronous_modes(
            TINY_VLLM_SERVER if args.quick else SMOLLM2_LORA_VLLM_ASYNC, args.repeats
        )
        return
    ensure_trl(args.install)
    import torch
    import transformers

    print(
        f"grpo bench: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {TRL_VERSION}, {cpu_model()}, "
        f"{args.threads} thread(s) pinned, {args.repeats} alternating repeats, "
        f"1-min load at start {load():.2f}",
        flush=True,
    )
    machine = spawn("machine", TINY, args.threads)
    limits = Machine(flops=machine["gflops"] * 1e9, bandwidth=machine["gbs"] * 1e9)
    forced = " ".join(f"{k}={v}" for k, v in DISPATCH_ENV.items())
    print(
        f"dispatch: torch CPU capability {machine['capability']}, BLAS {machine['blas']}, MKL "
        f"instructions {machine['mkl_instructions']}"
        + (f" ({forced})" if forced else "")
        + f"; the decoder streams weights through {machine['streaming']}",
        flush=True,
    )
    print(
        f"fp32 matmul ceiling (4096^3, {args.threads} threads): {machine['gflops']:.0f} GFLOP/s; "
        f"memory bandwidth (STREAM triad, 3 x 128 MiB): {machine['gbs']:.1f} GB/s",
        flush=True,
    )
    results = {}
    for name in names:
        workload = WORKLOADS[name]
        results[name] = compare(workload, args.repeats, args.threads, args.set)
    notes = []
    print(f"\n{HEADER}")
    for name, sides in results.items():
        workload = WORKLOADS[name]
        label = f"{name} T={workload.new_tokens} mb={workload.micro_batch}"
        label += " shared" * workload.share_prompts + " offload" * workload.offload_reference
        label += f" {workload.backend}" * (workload.backend != "lean")
        ours, trl = sides["ours"], sides["trl"]
        floor, note = workload_floors(workload, args.threads, limits)
        notes.append(f"{name}: {note}")
        print(row(label, "ours", ours, workload))
        print(row(label, "trl", trl, workload))
        print(floor_row(floor, workload))
        print(ratio_row("ours", ours, floor))
        print(ratio_row("trl", trl, floor))
        print(
            f"{'':<38}{'ours/trl':<10} completions/s {trl.step / ours.step:.2f}x, "
            f"step time {ours.step / trl.step:.2f}x, peak RSS {ours.rss / trl.rss:.2f}x; "
            f"mean length ours {ours.mean_length:.1f} trl {trl.mean_length:.1f}"
        )
    print(
        f"\nfloors (scripts/floors.py, docs/performance.md): each phase's least time at "
        f"{machine['gflops']:.0f} GFLOP/s and {machine['gbs']:.1f} GB/s, mean over the measured "
        "steps; a shared prompt counted once per group; score+ref = the reference's forward"
    )
    print("\n".join(notes))
    if not args.quick and not args.no_scaling:
        scaling(args.repeats, args.threads, args.set)
    if "tiny" in results:
        ratio = results["tiny"]["trl"].step / results["tiny"]["ours"].step
        print(f"\nratio tiny completions/s ours/trl: {ratio:.2f}")


def micro_batch_modes(repeats: int, threads: int) -> None:
    """`--micro-batches`: the update with fixed micro-batches of `micro_batch` rows against a
    token budget of the same padded size (micro_batch x (prompt + completion budget)), on one
    GSM8K-varied rollout, the same tokens for both (`run_update_piece`), each mode in its own
    process, alternating; update time and the process's peak RSS."""
    workload = GSM8K_VARIED
    budget = workload.micro_batch * (256 + workload.new_tokens)  # rows x (prompt + completion)
    modes = {"fixed": None, "tokens": budget}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, tokens in modes.items():
            runs[mode].append(
                spawn("update", replace(workload, micro_batch_tokens=tokens), threads)
            )
    lengths = runs["fixed"][0]["lengths"]
    print(
        f"\n{workload.name}: SmolLM2 + LoRA r16, {workload.prompts} x {workload.group} GSM8K "
        f"completions of up to {workload.new_tokens} tokens (not forced; lengths {lengths}), "
        f"the update with micro-batches of {workload.micro_batch} rows vs "
        f"micro_batch_tokens={budget}, {repeats} process(es) each, median of 3 updates"
    )
    sides = {}
    for mode, r in runs.items():
        assert all(x["lengths"] == lengths for x in r), "the modes must update the same rollout"
        sides[mode] = (
            statistics.median(x["update_s"] for x in r),
            statistics.median(x["peak_rss_mb"] for x in r),
        )
        print(
            f"  {mode:<7} update {sides[mode][0]:6.2f} s  peak RSS {sides[mode][1] / 1024:.2f} GB"
        )
    (fixed, fixed_rss), (tokens, tokens_rss) = sides["fixed"], sides["tokens"]
    print(
        f"  tokens/fixed: update time {tokens / fixed:.2f}x, peak RSS {tokens_rss / fixed_rss:.2f}x"
    )


def freed_memory_modes(repeats: int, threads: int) -> None:
    """`--freed-memory`: the update of SmolLM2 (full, then + LoRA) with the memory it frees kept
    for its next micro-batch (`grpo.heap.kept`) and without, alternated `repeats` times in one
    process (`run_heap_piece`): medians of the seconds and page faults per update."""
    for workload in (SMOLLM2, SMOLLM2_LORA):
        r = spawn("heap", workload, threads, [str(repeats)])
        wins = sum(k < d for k, d in zip(r["kept_s"], r["default_s"], strict=True))
        print(
            f"{workload.name}: the update alone, micro-batches of {workload.micro_batch}, "
            f"{repeats} alternations in one process; kept faster in {wins} of {repeats}"
        )
        for side in ("kept", "default"):
            seconds, faults = r[f"{side}_s"], r[f"{side}_faults"]
            print(
                f"  {side:<8} update {statistics.median(seconds):6.2f} s "
                f"({min(seconds):.2f}-{max(seconds):.2f})  "
                f"page faults {statistics.median(faults) / 1000:7.0f}k"
            )


def weight_sync_modes(repeats: int, threads: int) -> None:
    """`--weight-sync`: the seconds vLLM's weight sync takes per step for SmolLM2 + LoRA r16,
    the adapter alone against the merged state dict (`rollout.vllm.lora_sync`), each mode in its
    own process (one engine per process), alternating; medians over every process's syncs."""
    workload = SMOLLM2_LORA_VLLM
    runs: dict[str, list[dict]] = {"adapter": [], "merged": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(spawn("sync", workload, threads, [mode]))
    first = runs["adapter"][0]
    print(
        f"\nweight sync, SmolLM2-135M-Instruct + LoRA r16 on q, k, v, o "
        f"({first['adapter_params'] / 1e6:.2f}M adapter parameters of "
        f"{first['params'] / 1e6:.1f}M), vLLM in the process, {threads} thread(s), "
        f"{repeats} process(es) per mode x {len(first['sync_s'])} syncs; 1-min load {load():.2f}"
    )
    medians = {}
    for mode, r in runs.items():
        times = [t for x in r for t in x["sync_s"]]
        medians[mode] = statistics.median(times)
        print(
            f"  {mode:<8} {medians[mode]:.4f} s per sync (range {min(times):.4f}-"
            f"{max(times):.4f}), peak RSS {statistics.median(x['peak_rss_mb'] for x in r):.0f} MB"
        )
    print(f"  merged/adapter: {medians['merged'] / medians['adapter']:.1f}x")


def asynchronous_modes(workload: Workload, repeats: int) -> None:
    """`--asynchronous`: our step with `rollout.max_staleness` 0 and 1 against one vLLM server
    started here on core 0 (`python -m grpo.serve`, one thread), the trainer on core 1 (one
    thread), alternating, and the colocated synchronous step on both cores; step times as in
    the main table (the update's step plus the weight sync), medians over repeats."""
    from grpo.rollout.vllm_server import free_port, wait_until_healthy
    from grpo.run.servers import stop

    server, trainer = {min(os.sched_getaffinity(0))}, {max(os.sched_getaffinity(0))}
    port = free_port()
    with tempfile.TemporaryDirectory() as run_dir, tempfile.TemporaryFile() as log:
        cmd = [sys.executable, "-m", "grpo.serve", *our_overrides(workload, 1, run_dir)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        process = subprocess.Popen(
            [*cmd, f"rollout.vllm.port={port}"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, server),
        )
        try:
            wait_until_healthy(f"127.0.0.1:{port}", 900, alive=lambda: process.poll() is None)
            listed = [f"rollout.vllm.servers=[127.0.0.1:{port}]"]
            pinned = replace(workload, vllm_mode="server")
            runs: dict[str, list[dict]] = {"k=0": [], "k=1": [], "colocated": []}
            for _ in range(repeats):
                for k in (0, 1):
                    extra = [*listed, f"rollout.max_staleness={k}"]
                    runs[f"k={k}"].append(spawn("ours", pinned, 1, extra, cores=trainer))
                colocated = replace(workload, vllm_mode="colocate")
                runs["colocated"].append(spawn("ours", colocated, 2))
        finally:
            stop(process)
    print(
        f"\nasynchronous GRPO, {workload.name}: a vLLM server on core {min(server)}, the "
        f"trainer on core {min(trainer)}, one thread each; colocated: both cores, 2 threads; "
        f"{repeats} repeat(s); 1-min load {load():.2f}"
    )
    steps = {}
    for mode, r in runs.items():
        s = summarise(r)
        steps[mode] = s.step
        print(
            f"  {mode:<10} step {s.step:7.3f} s ({s.step_lo:.3f}-{s.step_hi:.3f})  generate "
            f"{s.generate:.3f}  score+ref {s.score_ref:.3f}  update {s.update:.3f}  sync "
            f"{s.sync:.3f}"
        )
    print(f"  k=1 / k=0: {steps['k=1'] / steps['k=0']:.2f}x (target <= 0.7x)")


def scaling(repeats: int, threads: int, extra: list[str]) -> None:
    """Our tiny step time for G x completion length in SCALING, and a linear fit."""
    print(f"\nscaling (ours, tiny, {TINY.prompts} prompts, median of {repeats} runs)")
    print(f"{'G':>3}{'length':>8}{'G x length':>12}{'step ms':>10}{'ms per G x length':>19}")
    points = []
    for g, t in SCALING:
        workload = replace(TINY, group=g, new_tokens=t)
        steps = [
            statistics.median(spawn("ours", workload, threads, extra)["step_s"])
            for _ in range(repeats)
        ]
        step = statistics.median(steps)
        points.append((g * t, step))
        print(f"{g:>3}{t:>8}{g * t:>12}{step * 1e3:>10.1f}{step * 1e3 / (g * t):>19.3f}")
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    worst = max(abs(intercept + slope * x - y) / y for x, y in points)
    print(
        f"fit: step = {intercept * 1e3:.1f} ms + {slope * 1e6:.1f} us x (G x length); "
        f"largest deviation from the line {worst:.0%}"
    )


def pieces(workloads: list[Workload], threads: int) -> None:
    """Our step's pieces under each switch, each measurement in a fresh process."""
    print(f"pieces: {threads} thread(s), wall ms (CPU ms), medians; 1-min load {load():.2f}")
    for workload in workloads:
        t = workload.new_tokens
        gen = spawn("generation", workload, threads)
        shape = f"{workload.prompts} x {workload.group} x {t} tokens"
        for key in ("transformers", "lean", "vllm"):
            if key not in gen:
                continue
            wall, cpu = gen[key]
            print(f"{workload.name}: generate {shape}, {key}: {wall * 1e3:.1f} ({cpu * 1e3:.1f})")
        for key in ("multinomial", "inverse_cdf"):
            wall, cpu = gen[key]
            print(f"{workload.name}: sampler {key}: {wall * 1e3:.3f} ({cpu * 1e3:.3f}) per token")
        for chunk in (None, 2**24):
            for micro in (8, 2, 1):
                piece = spawn("logprobs", workload, threads, [json.dumps([chunk, micro])])
                wall, cpu = piece["time"]
                print(
                    f"{workload.name}: policy forward+backward, chunk_logits={chunk}, "
                    f"micro-batch {micro}: {wall * 1e3:.1f} ({cpu * 1e3:.1f}), "
                    f"process peak RSS {piece['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    print(f"1-min load at the end {load():.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
