"""GRPO training: `python -m grpo.train [group=option ...] [key=value ...]`.

One step, as in DeepSeekMath (arXiv 2402.03300) Algorithm 1:
  1. sample `trainer.batch_size` prompts;
  2. generate G = `algorithm.num_responses_per_prompt` completions for each;
  3. score every completion with the reward (text in, numbers out);
  4. group advantages: rewards normalised within each prompt's group (no value function);
  5. one policy update: clipped surrogate with token ratios, k3 KL to the reference;
  6. log; evaluate and checkpoint at intervals.

Departures from the paper, by default (each is a config switch):
- one gradient step per generated batch (mu = 1, `algorithm.update_epochs`), so the "old"
  policy is the current one: ratios are 1 in value, the clip never binds, and the gradient is
  the plain policy gradient;
- the reference policy is the starting model for the whole run (the paper resets it after each
  outer iteration: `algorithm.reference_update`);
- LoRA adapters, and the reference is the base with adapters disabled (no second copy);
- log-probs are taken at the sampling temperature;
- the held-out evaluation before training goes to summary.json; metrics.jsonl has one line
  per optimiser step.
"""

from __future__ import annotations

import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from grpo import distributed
from grpo.advantages import group_advantages
from grpo.checkpoint import Checkpointer, start_run
from grpo.comparison import compare_models
from grpo.data import Splits
from grpo.dynamic_sampling import ScoredRollout, sample_groups
from grpo.metrics import (
    completion_metrics,
    parameter_norm,
    reward_metrics,
    sample_records,
    timing_metrics,
)
from grpo.modeling import Policy
from grpo.rewards import Reward
from grpo.rollout import generate, render_prompts
from grpo.run_info import job_threads
from grpo.sampler import GroupedSampler
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


def sample_and_score(
    data: Splits, sampler: GroupedSampler, policy: Policy, reward_fn: Reward, tr: DictConfig
) -> ScoredRollout:
    """Steps 1-3: take the next prompts, generate G completions each (rows grouped), score."""
    rows = [data.train[i] for i in next(sampler).prompt_indices]
    g = sampler.group_size
    questions = [r["question"] for r in rows[::g]]
    prompts = render_prompts(policy.tokenizer, questions, policy.use_chat_template)
    start = time.perf_counter()
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
        backend=tr.generation_backend,
    )
    generate_s = time.perf_counter() - start
    scores = reward_fn(rollout.texts, [r["answer"] for r in rows], rollout.lengths.tolist())
    return ScoredRollout(rows, rollout, scores, generate_s)


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run GRPO as configured, writing into `run_dir`; returns `cfg.objective` from the end."""
    validate_config(cfg)
    tr, g = cfg.trainer, cfg.algorithm.num_responses_per_prompt
    if threads := job_threads(tr.num_threads):  # null: the job's share of cores in a sweep
        torch.set_num_threads(threads)
    device = distributed.init(resolve_device(tr.device))  # torchrun/accelerate: join the ranks
    run_dir = distributed.share(run_dir)  # rank 0's run folder; only rank 0 writes into it
    # Metadata (rank 0); None = fresh run, refused over an existing one.
    resume = distributed.main_then_share(start_run, cfg, run_dir)
    seed_everything(cfg.seed + distributed.rank())  # each rank samples its own completions

    # Build: data, reward, loss, sampler, policy (+ reference), optimiser, logger.
    data = instantiate(cfg.data)
    reward_fn = instantiate(cfg.reward)
    evaluator = instantiate(cfg.eval.heldout)
    loss_fn = instantiate(cfg.algorithm.loss)
    sampler = instantiate(
        cfg.algorithm.sampler,
        num_prompts=len(data.train),
        batch_size=tr.batch_size,  # global: each rank takes its share, sampler.local_batch_size
        seed=cfg.seed,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    policy = instantiate(cfg.model, device=device)
    reference = (
        make_reference(
            policy, tr.temperature, offload=tr.offload_reference, **cfg.algorithm.reference_update
        )
        if cfg.algorithm.kl_coef > 0
        else None
    )
    distributed.prepare(policy.model, tr.strategy)  # several ranks: same start; FSDP shards
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = instantiate(tr.optimizer)(trainable)
    scheduler = instantiate(tr.scheduler)(optimizer)
    # Rank 0 logs; the other ranks get a logger that writes nothing.
    make_logger = distributed.NullLogger
    if distributed.is_main():
        make_logger = instantiate(cfg.logging, _partial_=True)
    logger = make_logger(
        run_dir=run_dir,
        max_steps=tr.max_steps,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    alg, pad_id = cfg.algorithm, policy.tokenizer.pad_token_id
    update_settings = {
        "micro_batch_size": tr.micro_batch_size,
        "inference_batch_size": tr.inference_batch_size,
        "share_prompts": tr.share_prompts,
        "max_grad_norm": tr.max_grad_norm,
        "temperature": tr.temperature,
        "epochs": alg.update_epochs,
        "num_mini_batches": alg.num_mini_batches,
        "mask_truncated": alg.mask_truncated,
    }
    scale = alg.advantage_scale if alg.advantage_normalization else "none"

    def run_eval() -> dict[str, float]:
        with distributed.gathered(policy.model):  # FSDP: whole weights; ranks split the rows
            return distributed.evaluate(evaluator, policy, data.test, reward_fn)

    ckpt = Checkpointer(run_dir, tr, policy, optimizer, scheduler, sampler, logger, reference)
    if resume is None:
        start_step, before = 0, run_eval()  # kept in summary.json, not a step of metrics.jsonl
    else:  # weights, optimizer, scheduler, sampler, RNG: continues exactly
        start_step, before = ckpt.restore(resume)
    after: dict[str, float] = {}
    if not distributed.sharded(policy.model):  # FSDP runs keep no checkpoints yet
        ckpt.catch_signals()  # SIGTERM/SIGINT: finish the step, checkpoint, exit
    for step in range(start_step + 1, tr.max_steps + 1):
        t0 = time.perf_counter()

        # 1-3. Sample prompts, generate G completions each, score; with dynamic sampling (DAPO)
        # drop groups whose rewards all agree and sample more to refill.
        with distributed.gathered(policy.model):  # FSDP: generate with the whole weights
            batch, sampling_stats = sample_groups(
                partial(sample_and_score, data, sampler, policy, reward_fn, tr),
                sampler.local_batch_size,
                g,
                pad_id,
                **alg.dynamic_sampling,
            )
        whole = distributed.gather_batch(batch, pad_id)  # every rank's groups: advantages, logs
        rows, rollout, scores, rewards = whole.rows, whole.rollout, whole.scores, whole.rewards
        t1 = t0 + batch.generate_s  # generation; scoring and filtering count as scoring
        # 4. Group advantages.
        advantages = group_advantages(rewards, g, scale=scale, reward_range=alg.reward_range)
        t2 = time.perf_counter()
        # 5. Policy update: mu epochs over mini-batches; then a reference update, if one is due.
        stats = policy_update(
            policy,
            batch.rollout,  # this rank's groups
            distributed.my_part(advantages).to(batch.rollout.completion_ids.device),
            loss_fn,
            optimizer,
            reference,
            **update_settings,
        )
        stats.update(sampling_stats)
        if reference is not None:
            reference.maybe_update(step)
        scheduler.step()
        t3 = time.perf_counter()
        # 6. Log, evaluate, checkpoint.
        metrics = {f"train/{k}": v for k, v in stats.items()}
        metrics.update(reward_metrics(rewards, scores.parts, g))
        metrics.update(completion_metrics(rollout))
        metrics["train/learning_rate"] = scheduler.get_last_lr()[0]
        metrics["train/param_norm"] = parameter_norm(trainable)
        metrics["train/epoch"] = sampler.epoch
        metrics.update(timing_metrics(t0, t1, t2, t3, int(rollout.lengths.sum())))
        if step == tr.max_steps or (tr.eval_every and step % tr.eval_every == 0):
            after = run_eval()
            metrics.update(after)
        logger.log(step, metrics)
        logger.log_samples(step, sample_records(rows, rollout.texts, scores, advantages))
        ckpt.step_end(step, before)  # a checkpoint every save_every steps, or on a signal
    ckpt.release_signals()

    summary = {**after, "before": before, "after": after, "steps": tr.max_steps}
    weights = distributed.full_state_dict(policy.model)  # FSDP: from all ranks' shards
    with distributed.gathered(policy.model):  # FSDP: whole weights for the comparison
        if distributed.is_main():  # the one writer
            policy.model.save_pretrained(run_dir / "model", state_dict=weights)
            policy.tokenizer.save_pretrained(run_dir / "model")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print_before_after(before, after)
            if cfg.eval.comparison.at_end:  # the original and the trained model side by side
                comparison = compare_models(cfg, policy, data.test, reward_fn, run_dir)
                summary["comparison"] = comparison["comparison_stats"]
    logger.finish(summary)
    return summary[cfg.objective]


def print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    print("\nheld-out results (greedy)        before    after")
    for key in before:
        print(f"  {key:<30} {before[key]:8.3f} {after[key]:8.3f}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    sys.argv += distributed.hydra_overrides()  # ranks > 0: no run folder of their own
    main()
