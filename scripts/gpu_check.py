"""GPU check of the vLLM backend: `bash scripts/gpu_check.sh` on a machine with one CUDA GPU.

No hub access is assumed: a Qwen2.5-0.5B-architecture model (24 layers, hidden 896, 14 query and
2 key/value heads, intermediate 4864) with random bf16 weights is built with the tiny test
tokenizer. Prints, for 8 prompts x 4 completions x 128 forced tokens in bf16: generation time of
the lean decoder, transformers' `generate` and vLLM, and the engine's log-probs against the
training forward; then 3 training steps with `rollout.backend=vllm` per mode (`MODES`: the
engine in the process with full fine-tuning, LoRA adapter sync and merged sync; a vLLM server the
trainer starts on the same GPU, full (weights by CUDA IPC and by files) and LoRA; with 2 GPUs, an
engine on each of 2 ranks, and a server on GPU 1 of its own taking the weights by NCCL and by
files), each
step's time split (generation, scoring, update, weight sync) and the engine's mismatch with the
training forward.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from grpo.actor.logprobs import token_logprobs  # noqa: E402
from grpo.model.loading import load_policy, tiny_checkpoint  # noqa: E402
from grpo.rollout.backends import build_backend  # noqa: E402
from grpo.rollout.settings import SamplingSettings  # noqa: E402
from grpo.rollout.source import tokenize_prompts  # noqa: E402
from grpo.rollout.vllm_server import free_port, wait_until_healthy  # noqa: E402
from grpo.tasks.arithmetic import tokenizer_corpus  # noqa: E402


def build(folder: Path) -> str:
    """The random Qwen2.5-0.5B-shaped checkpoint, with the tiny tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("~/.cache/grpo", tokenizer_corpus()))
    config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(folder: str) -> None:
    """Generation by each backend, the engine's log-probs, and one weight sync."""
    policy = load_policy(folder, dtype="bfloat16", device="cuda")
    settings = SamplingSettings(128, max_prompt_length=384, min_new_tokens=128)
    prompts = [f"Question: what is {i} + {i + 1}?\nAnswer:" for i in range(8)]
    ids, mask = tokenize_prompts(policy.tokenizer, prompts, 384, "cuda")
    backends = {}
    for name in ("lean", "transformers", "vllm"):
        options = {"gpu_memory_utilization": 0.3} if name == "vllm" else {}
        backends[name] = backend = build_backend(name, policy, settings, options)
        seconds = timed(lambda b=backend: b.generate(ids, mask, 4, settings))
        print(f"generate 8 x 4 x 128 bf16, {name}: {seconds:.2f} s", flush=True)
    engine = backends["vllm"]
    rollout = engine.generate(ids, mask, 4, settings)
    with torch.no_grad():
        train_logp, _ = token_logprobs(policy.model, rollout, 1.0)
    mask = rollout.completion_mask.bool()
    gap = (rollout.sampling_logprobs[mask] - train_logp[mask]).abs()
    print(f"engine vs training log-probs, bf16: mean {gap.mean():.4f}, max {gap.max():.4f}")
    print(f"weight sync: {engine.sync(policy.model):.2f} s", flush=True)


# Every training run below: the random Qwen2.5-0.5B shape in bf16, 3 steps of 8 prompts x 4
# completions of up to 128 tokens, vLLM generating.
RUN_ARGS = [
    "model=qwen2_5_0_5b", "model.dtype=bfloat16", "model.lm_head_fp32=true",
    "rollout.backend=vllm", "trainer.max_steps=3", "trainer.batch_size=8",
    "trainer.learning_rate=1e-6", "trainer.device=cuda", "rollout.max_new_tokens=128",
    "task.num_test=8", "eval.comparison.at_end=false", "logging.progress_bar=false",
]  # fmt: skip
NO_DROPOUT = "model.lora.dropout=0.0"  # LoRA: the training forward then equals the engine's
# Each mode: (name, launcher prefix, overrides), run when the machine has the GPUs it needs.
MODES = [
    ("colocate, full fine-tuning", [], ["model.lora.enabled=false"]),
    ("colocate, LoRA, adapter sync", [], ["rollout.vllm.lora_sync=adapter", NO_DROPOUT]),
    ("colocate, LoRA, merged sync", [], ["rollout.vllm.lora_sync=merged", NO_DROPOUT]),
    # The trainer and the server it starts (servers=auto) share the GPU: weights by CUDA IPC
    # (auto's choice there), then by files, for the comparison.
    ("server, full fine-tuning, weights by ipc", [], ["model.lora.enabled=false",
     "rollout.vllm.mode=server"]),
    ("server, full fine-tuning, weights by files", [], ["model.lora.enabled=false",
     "rollout.vllm.mode=server", "rollout.vllm.weight_transfer=files"]),
    ("server, LoRA, adapter sync", [], ["rollout.vllm.mode=server", NO_DROPOUT]),
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TWO_RANKS = ("colocate on 2 ranks, full fine-tuning", TORCHRUN, ["model.lora.enabled=false"])
# With 2 GPUs: a server of its own on GPU 1 (`python -m grpo.serve`), the trainer on GPU 0; whole
# weights by NCCL (auto's choice for listed servers on CUDA), then by files, for the comparison.
SERVER_GPU = "1"
OWN_SERVER = [
    (f"server on GPU {SERVER_GPU}, full fine-tuning, weights by {transfer}", [],
     ["model.lora.enabled=false", "rollout.vllm.mode=server",
      f"rollout.vllm.weight_transfer={transfer}"])
    for transfer in ("nccl", "files")
]  # fmt: skip


@contextlib.contextmanager
def own_server(folder: str) -> Iterator[str]:
    """`python -m grpo.serve` with the runs' config on GPU `SERVER_GPU`: its address once up."""
    port, log = free_port(), Path(tempfile.mkdtemp()) / "server.log"
    args = [*RUN_ARGS, f"model.checkpoint={folder}", "model.lora.enabled=false"]
    args += ["rollout.vllm.gpu_memory_utilization=0.9", f"rollout.vllm.port={port}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=SERVER_GPU)
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "grpo.serve", *args, f"hydra.run.dir={log.parent}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        wait_until_healthy(address, 600, alive=lambda: server.poll() is None)
        yield address
    finally:
        server.terminate()
        server.wait(60)


def train_run(folder: str, name: str, launcher: list[str], overrides: list[str]) -> None:
    """Three training steps in mode `name`; prints each step's time split and the engine's
    mismatch with the training forward (`train/rollout_kl_k3`)."""
    run = Path(tempfile.mkdtemp()) / "run"
    command = launcher or [sys.executable]
    args = [*RUN_ARGS, f"model.checkpoint={folder}", *overrides, f"hydra.run.dir={run}"]
    start = time.perf_counter()
    subprocess.run([*command, "-m", "grpo.train", *args], cwd=REPO, check=True)
    print(f"\n== {name}: {time.perf_counter() - start:.0f} s in all", flush=True)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        split = {
            k.removeprefix("time/"): round(v, 2) for k, v in m.items() if k.startswith("time/")
        }
        print(f"  step {m['step']}: {split}, rollout_kl_k3 {m.get('train/rollout_kl_k3'):.2e}")


def main() -> None:
    assert torch.cuda.is_available(), "a CUDA GPU is needed"
    folder = build(Path(tempfile.mkdtemp()) / "qwen2.5-0.5b-random")
    measure(folder)
    torch.cuda.empty_cache()
    modes = MODES + ([TWO_RANKS] if torch.cuda.device_count() >= 2 else [])
    for name, launcher, overrides in modes:
        train_run(folder, name, launcher, overrides)
    if torch.cuda.device_count() >= 2:
        with own_server(folder) as address:
            for name, launcher, overrides in OWN_SERVER:
                train_run(folder, name, launcher, [*overrides, f"rollout.vllm.servers=[{address}]"])


if __name__ == "__main__":
    main()
