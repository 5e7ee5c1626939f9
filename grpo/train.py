"""GRPO training: `python -m grpo.train [group=option ...] [key=value ...]`.

One step, as in DeepSeekMath (arXiv 2402.03300) Algorithm 1:
  1. sample `trainer.batch_size` prompts of the task;
  2. generate G = `algorithm.num_responses_per_prompt` completions for each;
  3. score every completion with the reward (text in, numbers out);
  4. advantages from each prompt's group of rewards (no value function);
  5. the policy update: the policy loss on token ratios, the KL to the reference;
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
import os
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

from grpo.algorithm.advantages import estimate_advantages
from grpo.algorithm.dynamic_sampling import sample_groups
from grpo.algorithm.loss import GRPOLoss
from grpo.algorithm.update import no_grad_logprobs, policy_update, reward_kl_penalty
from grpo.batch import ScoredRollout
from grpo.evaluation.comparison import compare_models
from grpo.infra import distributed
from grpo.infra.checkpoint import Checkpointer, start_run
from grpo.infra.config import micro_batch_size, one_line, validate_config
from grpo.infra.metrics import sample_records, step_metrics
from grpo.infra.records import job_threads
from grpo.model.loading import Policy
from grpo.model.reference import Reference
from grpo.rollout.generation import generate, render_prompts
from grpo.rollout.sampler import GroupedSampler
from grpo.rollout.vllm_engine import VLLMEngine
from grpo.tasks.base import Task
from grpo.tasks.rewards import Reward


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
    task: Task,
    sampler: GroupedSampler,
    policy: Policy,
    reward_fn: Reward,
    rollout: DictConfig,
    with_logprobs: bool,
) -> ScoredRollout:
    """Steps 1-3: take the next prompts, generate G completions each (rows grouped), score."""
    rows = [task.train[i] for i in next(sampler).prompt_indices]
    g = sampler.group_size
    prompts = render_prompts(policy.tokenizer, task, rows[::g], policy.use_chat_template)
    start = time.perf_counter()
    generated = generate(
        policy.model,
        policy.tokenizer,
        prompts,
        g,
        rollout.max_new_tokens,
        rollout.max_prompt_length,
        rollout.temperature,
        rollout.top_p,
        top_k=rollout.top_k,
        stop_pattern=task.stop_pattern,
        min_new_tokens=rollout.min_new_tokens,
        backend=rollout.backend,
        engine=policy.engine,
        with_logprobs=with_logprobs,
    )
    generate_s = time.perf_counter() - start
    scores = reward_fn(
        generated.texts,
        [task.answer(row) for row in rows],
        [p for p in prompts for _ in range(g)],
        generated.lengths.tolist(),
        rollout.max_new_tokens,
    )
    return ScoredRollout(rows, generated, scores, generate_s)


def build_loss(cfg: DictConfig) -> GRPOLoss:
    """`algorithm.loss` with its policy loss, KL and rollout correction, and the generation
    budget (Dr. GRPO's constant)."""
    alg = cfg.algorithm
    return instantiate(
        alg.loss,
        policy_loss=alg.policy_loss,
        kl=alg.kl,
        rollout_correction=alg.rollout_correction,
        max_completion_length=cfg.rollout.max_new_tokens,
    )


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run GRPO as configured, writing into `run_dir`; returns `cfg.objective` from the end."""
    validate_config(cfg)
    alg, ro, tr = cfg.algorithm, cfg.rollout, cfg.trainer
    g = alg.num_responses_per_prompt
    if threads := job_threads(tr.num_threads):  # null: the job's share of cores in a sweep
        torch.set_num_threads(threads)
    device = distributed.init(resolve_device(tr.device))  # torchrun/accelerate: join the ranks
    run_dir = distributed.share(run_dir)  # rank 0's run folder; only rank 0 writes into it
    # Metadata (rank 0); None = fresh run, refused over an existing one.
    resume = distributed.main_then_share(start_run, cfg, run_dir)
    seed_everything(cfg.seed + distributed.rank())  # each rank samples its own completions

    # Build: task, reward, evaluation, loss, sampler, policy (+ reference), optimiser, logger.
    task = instantiate(cfg.task)
    reward_fn = instantiate(cfg.reward)
    evaluator = instantiate(cfg.eval.heldout, task=task, rollout=ro)
    loss_fn = build_loss(cfg)
    sampler = instantiate(
        alg.sampler,
        num_prompts=len(task.train),
        batch_size=tr.batch_size,  # global: each rank takes its share, sampler.local_batch_size
        group_size=g,
        seed=cfg.seed,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    policy = instantiate(cfg.model, device=device)
    if ro.backend == "vllm":  # colocated: fed the policy's weights after every step
        policy.engine = VLLMEngine(
            policy.checkpoint,
            cfg.model.dtype,
            ro.max_prompt_length + ro.max_new_tokens,
            **ro.vllm,
        )
    reference = None
    if alg.kl.coef > 0:
        reference = Reference(
            policy, ro.temperature, offload=tr.offload_reference, **alg.reference_update
        )
    distributed.prepare(policy.model, tr.strategy)  # several ranks: same start; FSDP shards
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = instantiate(tr.optimizer, lr=tr.learning_rate)(trainable)
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
    ckpt = Checkpointer(run_dir, tr, policy, optimizer, scheduler, sampler, logger, reference)
    with_logprobs = alg.rollout_correction.name != "none"  # vLLM keeps them always
    draw = partial(sample_and_score, task, sampler, policy, reward_fn, ro, with_logprobs)
    size = micro_batch_size(cfg)
    logprob_settings = {
        "temperature": ro.temperature,
        "batch_size": tr.inference_batch_size or size,
        "share_prompts": tr.share_prompts,
        "need_old": alg.update_epochs * alg.num_mini_batches > 1 or alg.kl.in_reward,
    }
    update_settings = {
        "micro_batch_size": size,
        "share_prompts": tr.share_prompts,
        "max_grad_norm": tr.max_grad_norm,
        "temperature": ro.temperature,
        "epochs": alg.update_epochs,
        "num_mini_batches": alg.num_mini_batches,
        "mask_truncated": alg.mask_truncated,
    }

    def run_eval() -> dict[str, float]:
        with distributed.gathered(policy.model):  # FSDP: whole weights; ranks split the rows
            return distributed.evaluate(evaluator, policy, task.test, reward_fn)

    if resume is not None:  # weights, optimizer, scheduler, sampler, RNG: continues exactly
        start_step, before = ckpt.restore(resume)
    if policy.engine is not None:
        policy.engine.sync(policy.model)
    if resume is None:
        start_step, before = 0, run_eval()  # kept in summary.json, not a step of metrics.jsonl
    after: dict[str, float] = {}
    ckpt.catch_signals()  # SIGTERM/SIGINT: finish the step, checkpoint, exit
    for step in range(start_step + 1, tr.max_steps + 1):
        t0 = time.perf_counter()
        # 1-3. Sample prompts, generate G completions each, score (all ranks' groups); DAPO's
        # dynamic sampling drops groups whose rewards all agree and samples more to refill.
        with distributed.gathered(policy.model):  # FSDP: generate with the whole weights
            batch, stats = sample_groups(draw, tr.batch_size, g, **alg.dynamic_sampling)
        mine = distributed.my_part(batch, device)  # this rank's groups
        t1 = t0 + batch.generate_s  # generation; scoring and filtering count as scoring
        # 4. Token log-probs without gradient (reference, old policy), then the advantages.
        scores = no_grad_logprobs(policy, reference, mine.rollout, loss_fn, **logprob_settings)
        rewards = batch.rewards
        if alg.kl.in_reward:  # the KL penalty in the reward (InstructGPT, verl)
            rewards = rewards - reward_kl_penalty(scores, mine.rollout, alg.kl)
        advantages = estimate_advantages(alg.advantage, rewards, g, batch.scores.part_tensors)
        t2 = time.perf_counter()
        # 5. Policy update: mu epochs over mini-batches; then a reference update, if one is due.
        stats |= policy_update(
            policy,
            mine.rollout,
            distributed.my_rows(advantages).to(device),
            scores,
            loss_fn,
            optimizer,
            **update_settings,
        )
        if reference is not None:
            reference.maybe_update(step)
        scheduler.step()
        t3 = time.perf_counter()
        # 6. Log, evaluate, checkpoint.
        metrics = step_metrics(stats, batch, g, scheduler, trainable, sampler, (t0, t1, t2, t3))
        if policy.engine is not None:  # the next generation samples from the updated policy
            metrics["time/weight_sync_s"] = policy.engine.sync(policy.model)
        if step == tr.max_steps or (cfg.eval.every and step % cfg.eval.every == 0):
            after = run_eval()
            metrics.update(after)
        logger.log(step, metrics)
        logger.log_samples(step, sample_records(task, batch, advantages))
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
                comparison = compare_models(cfg, policy, evaluator, reward_fn, run_dir)
                summary["comparison"] = comparison["comparison_stats"]
    logger.finish(summary)
    return summary[cfg.objective]


def print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    print("\nheld-out results (greedy)        before    after")
    for key in before:
        print(f"  {key:<30} {before[key]:8.3f} {after[key]:8.3f}")


def exit_on_config_error(error: Exception) -> None:
    """A config error: print it as one line naming the key and exit with code 2. Any other
    error returns, to be raised with its traceback."""
    line = one_line(error)
    if line is None:
        return
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:
        exit_on_config_error(error)  # before Hydra reports the job's failure
        raise


def cli() -> None:
    """The command line: `main`, with composition errors also reported as one line."""
    sys.argv += distributed.hydra_overrides()  # ranks > 0: no run folder of their own
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors to us
    try:
        main()
    except Exception as error:
        exit_on_config_error(error)
        raise


if __name__ == "__main__":
    cli()
