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

With `rollout.max_staleness=k >= 1` (vLLM servers) steps 1-3 run ahead on a producer thread
(`grpo.rollout.producer`): step s trains on a batch sampled by policy version s - 1 - k or
newer while the servers generate the next ones.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from grpo import distributed
from grpo.actor.reference import Reference
from grpo.actor.update import Actor, reward_kl_penalty
from grpo.algorithm.advantages import estimate_advantages
from grpo.batch import ScoredRollout
from grpo.environments.base import Environment
from grpo.evaluation.comparison import compare_models
from grpo.rollout.dynamic_sampling import sample_groups
from grpo.rollout.producer import Producer
from grpo.rollout.sampler import GroupedSampler
from grpo.run.build import (
    build_environment,
    build_evaluator,
    build_loss,
    build_source,
    sampling_settings,
    update_settings,
)
from grpo.run.checkpoint import Checkpointer, start_run
from grpo.run.config import ConfigError, command_line, exit_on_config_error, validate_config
from grpo.run.loggers import NullLogger
from grpo.run.metrics import sample_records, step_metrics
from grpo.run.records import job_threads
from grpo.run.servers import rollout_servers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    """`trainer.device` on this machine: auto is CUDA when there is one; cuda without one is a
    config error (before any model loads)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda': no CUDA device is available on this machine")
    return device


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run GRPO as configured, writing into `run_dir`; returns `cfg.objective` from the end."""
    distributed.adopt_slurm()  # SLURM tasks without torchrun: ranks from SLURM's variables
    validate_config(cfg)  # every rule, before anything loads
    environment = build_environment(cfg)  # what answers a model turn (its settings checked)
    # rollout.vllm.mode=server: the vLLM servers answer and serve this model before the policy
    # loads (servers=auto: started here, and stopped however the run ends); the environment's
    # processes (a tool's sandbox) stop with the run too.
    with rollout_servers(cfg, run_dir) as servers, contextlib.closing(environment):
        return run(cfg, run_dir, environment, servers)


def run(
    cfg: DictConfig, run_dir: Path, environment: Environment, servers: list[str] | None = None
) -> float:
    """`train` once the config is checked and the rollout servers, if any, are up (their
    addresses: `servers`)."""
    alg, tr = cfg.algorithm, cfg.trainer
    g = alg.num_responses_per_prompt
    if threads := job_threads(tr.num_threads):  # null: the job's share of cores in a sweep
        torch.set_num_threads(threads)
    device = distributed.init(resolve_device(tr.device))  # torchrun/accelerate: join the ranks
    run_dir = distributed.share(run_dir)  # rank 0's run folder; only rank 0 writes into it
    # Metadata (rank 0); None = fresh run, refused over an existing one.
    resume = distributed.main_then_share(start_run, cfg, run_dir)
    seed_everything(cfg.seed + distributed.rank())  # each rank samples its own completions

    # Build: task, reward, loss, sampler, policy (+ reference), optimiser, logger, actor.
    task = instantiate(cfg.task)
    reward_fn = instantiate(cfg.reward)
    sampling = sampling_settings(cfg, task)
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
    reference = None
    if alg.kl.coef > 0:
        reference = Reference(
            policy, cfg.rollout.temperature, offload=tr.offload_reference, **alg.reference_update
        )
    distributed.prepare(policy.model, tr.strategy)  # several ranks: same start; FSDP shards
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = instantiate(tr.optimizer, lr=tr.learning_rate)(trainable)
    scheduler = instantiate(tr.scheduler)(optimizer)
    actor = Actor(policy, reference, loss_fn, optimizer, update_settings(cfg))
    # Rank 0 logs; the other ranks get a logger that writes nothing.
    make_logger = instantiate(cfg.logging, _partial_=True) if distributed.is_main() else NullLogger
    logger = make_logger(
        run_dir=run_dir,
        max_steps=tr.max_steps,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    ckpt = Checkpointer(run_dir, tr, policy, optimizer, scheduler, sampler, logger, reference)
    if resume is not None:  # weights, optimizer, scheduler, sampler, RNG: continues exactly
        start_step, before = ckpt.restore(resume)
    # The rollout source: the backend (rollout.backend) holds the policy's current weights; the
    # environment answers the model's turns (environment=single_turn: none).
    source = build_source(cfg, task, policy, reward_fn, sampling, environment, servers)
    evaluator = build_evaluator(cfg, source, sampling)

    def sample(
        prompts: GroupedSampler = sampler, generate: Callable[..., ScoredRollout] = source
    ) -> tuple[ScoredRollout, dict[str, float]]:
        """1-3. The step's batch: this rank's share of the next prompts of `prompts`, G
        completions each by `generate`, scored, all ranks' groups; DAPO's dynamic sampling drops
        groups whose rewards all agree and samples more to refill."""

        def draw() -> ScoredRollout:
            rows = [task.train[i] for i in next(prompts).prompt_indices]
            return generate(rows[::g], g, sampling)

        with distributed.gathered(policy.model):  # FSDP: generate with the whole weights
            return sample_groups(draw, tr.batch_size, g, **alg.dynamic_sampling)

    producer: Producer | None = None  # rollout.max_staleness >= 1: set below

    def run_eval() -> dict[str, float]:
        # FSDP: whole weights, ranks split the rows; a producer waits (the weights just synced)
        paused = producer.exclusive() if producer else nullcontext()
        with distributed.gathered(policy.model), paused:
            return evaluator(task.test)

    if resume is None:
        start_step, before = 0, run_eval()  # kept in summary.json, not a step of metrics.jsonl
    # rollout.max_staleness = k >= 1: a producer thread samples the next steps' batches ahead
    # with the newest weights the servers hold, at most k versions behind the policy trained.
    if k := cfg.rollout.max_staleness:
        producer = Producer(sample, sampler, source, k, start_step + 1, tr.max_steps, cfg.seed)
    sync = source.backend.sync if producer is None else producer.publish
    after: dict[str, float] = {}
    # SIGTERM/SIGINT: finish the step, checkpoint, exit; a lost rollout server: checkpoint the
    # last step whose update is done, exit with one line.
    with ckpt.guard(before), producer or nullcontext():
        for step in range(start_step + 1, tr.max_steps + 1):
            t0 = time.perf_counter()
            # 1-3. Sample prompts, generate G completions each, score (`sample`); or take the
            # batch the producer sampled ahead for this step.
            batch, stats = sample() if producer is None else producer.next(step)
            mine = distributed.my_part(batch, device)  # this rank's groups
            t1 = time.perf_counter()
            # 4. Token log-probs without gradient (reference, old policy), then the advantages.
            scores = actor.score(mine.rollout)
            t2 = time.perf_counter()
            rewards = batch.rewards
            if alg.kl.in_reward:  # the KL penalty in the reward (InstructGPT, verl)
                rewards = rewards - reward_kl_penalty(scores, mine.rollout, alg.kl)
            advantages = estimate_advantages(alg.advantage, rewards, g, batch.scores.part_tensors)
            t3 = time.perf_counter()
            # 5. Policy update: mu epochs over mini-batches; then a reference update, if one is due.
            stats |= actor.update(mine.rollout, distributed.my_rows(advantages).to(device), scores)
            if reference is not None:
                reference.maybe_update(step)
            scheduler.step()
            t4 = time.perf_counter()
            # 6. Log, evaluate, checkpoint; the backend then samples from the updated policy.
            seconds = {
                "generate": batch.generate_s,
                "reward": batch.reward_s,
                "logprobs": t2 - t1,
                "advantages": t3 - t2,
                "update": t4 - t3,
                "step": t4 - t0,
            }
            metrics = step_metrics(stats, batch, g, scheduler, trainable, sampler, seconds)
            metrics["time/weight_sync_s"] = sync(policy.model)
            if producer is not None:  # staleness, waiting and busy time of the two threads
                metrics.update(producer.metrics(step))
            if step == tr.max_steps or (cfg.eval.every and step % cfg.eval.every == 0):
                after = run_eval()
                metrics.update(after)
            logger.log(step, metrics)
            logger.log_samples(step, sample_records(task, batch, advantages))
            ckpt.step_end(step, before)  # a checkpoint every save_every steps, or on a signal

    if not after:  # resumed from the last step's checkpoint: nothing left to train
        after = run_eval()
    summary = {**after, "before": before, "after": after, "steps": tr.max_steps}
    weights = distributed.full_state_dict(policy.model)  # FSDP: from all ranks' shards
    with distributed.gathered(policy.model):  # FSDP: whole weights for the comparison
        if distributed.is_main():  # the one writer
            policy.model.save_pretrained(run_dir / "model", state_dict=weights)
            policy.tokenizer.save_pretrained(run_dir / "model")
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print_before_after(before, after)
            if cfg.eval.comparison.at_end:  # the original and the trained model side by side
                comparison = compare_models(cfg, evaluator, run_dir)
                summary["comparison"] = comparison["comparison_stats"]
    logger.finish(summary)
    return summary[cfg.objective]


def print_before_after(before: dict[str, float], after: dict[str, float]) -> None:
    print("\nheld-out results (greedy)        before    after")
    for key in before:
        print(f"  {key:<30} {before[key]:8.3f} {after[key]:8.3f}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:
        exit_on_config_error(error)  # before Hydra reports the job's failure
        raise


def cli() -> None:
    """The command line: `main`, with composition errors also reported as one line."""
    distributed.adopt_slurm()
    sys.argv += distributed.hydra_overrides()  # ranks > 0: no run folder of their own
    command_line(main)


if __name__ == "__main__":
    cli()
