"""GRPO training: `python -m grpo.train [group=option ...] [key=value ...]`.

One step, as in DeepSeekMath (arXiv 2402.03300) Algorithm 1:
  1. sample `trainer.batch_size` prompts;
  2. generate G = `algorithm.num_responses_per_prompt` completions for each;
  3. score every completion with the reward (text in, numbers out);
  4. group advantages: rewards normalised within each prompt's group (no value function);
  5. one policy update: clipped surrogate with token ratios, k3 KL to the reference;
  6. log; evaluate and checkpoint at intervals.

Departures from the paper, on purpose:
- one gradient step per generated batch (mu = 1), so the "old" policy is the current one:
  ratios are 1 in value, the clip never binds, and the gradient is the plain policy gradient;
- the reference policy is the starting model for the whole run (the paper resets it to the
  current policy after each outer iteration);
- LoRA adapters by default, and the reference is the base with adapters disabled;
- log-probs are taken at the sampling temperature.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from grpo.advantages import group_advantages
from grpo.evaluation import evaluate
from grpo.metrics import completion_metrics, reward_metrics
from grpo.rollout import generate, render_prompts
from grpo.update import make_reference, policy_update
from grpo.validation import validate_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    return device


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run GRPO as configured, writing into `run_dir`; returns `cfg.objective` from the end."""
    validate_config(cfg)
    tr, g = cfg.trainer, cfg.algorithm.num_responses_per_prompt
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    seed_everything(cfg.seed)

    # Build: data, reward, loss, sampler, policy (+ reference), optimiser, logger.
    data = instantiate(cfg.data)
    reward_fn = instantiate(cfg.reward)
    loss_fn = instantiate(cfg.algorithm.loss)
    sampler = instantiate(
        cfg.algorithm.sampler, num_prompts=len(data.train), batch_size=tr.batch_size, seed=cfg.seed
    )
    policy = instantiate(cfg.model, device=resolve_device(tr.device))
    reference = make_reference(policy, tr.temperature) if cfg.algorithm.kl_coef > 0 else None
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = instantiate(tr.optimizer)(trainable)
    scheduler = instantiate(tr.scheduler)(optimizer)
    logger = instantiate(cfg.logging, _partial_=True)(
        run_dir=run_dir,
        max_steps=tr.max_steps,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    scale = cfg.algorithm.advantage_scale if cfg.algorithm.advantage_normalization else "none"

    def run_eval() -> dict[str, float]:
        metrics, _ = evaluate(
            policy,
            data.test,
            reward_fn,
            tr.eval_max_new_tokens,
            tr.eval_batch_size,
            tr.max_prompt_length,
            tr.stop_pattern,
        )
        return metrics

    before = run_eval()
    after: dict[str, float] = {}
    for step in range(1, tr.max_steps + 1):
        t0 = time.perf_counter()
        # 1-2. Sample prompts, generate G completions each (rows grouped by prompt).
        batch = next(sampler)
        rows = [data.train[i] for i in batch.prompt_indices]
        prompts = render_prompts(
            policy.tokenizer, [r["question"] for r in rows[::g]], policy.use_chat_template
        )
        rollout = generate(
            policy.model,
            policy.tokenizer,
            prompts,
            g,
            tr.max_new_tokens,
            tr.max_prompt_length,
            tr.temperature,
            tr.top_p,
            stop_pattern=tr.stop_pattern,
            min_new_tokens=tr.min_new_tokens,
        )
        t1 = time.perf_counter()
        # 3. Score. 4. Group advantages.
        scores = reward_fn(rollout.texts, [r["answer"] for r in rows], rollout.lengths.tolist())
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        advantages = group_advantages(rewards, g, scale=scale).to(rollout.completion_ids.device)
        t2 = time.perf_counter()
        # 5. Policy update.
        stats = policy_update(
            policy,
            rollout,
            advantages,
            loss_fn,
            optimizer,
            reference,
            tr.micro_batch_size,
            tr.max_grad_norm,
            tr.temperature,
        )
        scheduler.step()
        t3 = time.perf_counter()
        # 6. Log, evaluate, checkpoint.
        metrics = {f"train/{k}": v for k, v in stats.items()}
        metrics.update(reward_metrics(rewards, scores.parts, g))
        metrics.update(completion_metrics(rollout))
        metrics.update(
            {
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/epoch": sampler.epoch,
                "time/generate_s": t1 - t0,
                "time/score_s": t2 - t1,
                "time/update_s": t3 - t2,
                "time/step_s": t3 - t0,
                "time/tokens_per_s": float(rollout.lengths.sum()) / (t3 - t0),
            }
        )
        if step == tr.max_steps or (tr.eval_every and step % tr.eval_every == 0):
            after = run_eval()
            metrics.update(after)
        logger.log(step, metrics)

    logger.close()
    policy.model.save_pretrained(run_dir / "model")
    policy.tokenizer.save_pretrained(run_dir / "model")
    summary = {**after, "before": before, "after": after, "steps": tr.max_steps}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_before_after(before, after)
    return summary[cfg.objective]


def print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    print("\nheld-out results (greedy)        before    after")
    for key in before:
        print(f"  {key:<30} {before[key]:8.3f} {after[key]:8.3f}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
