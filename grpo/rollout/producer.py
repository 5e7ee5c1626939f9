"""Generation ahead of training (`rollout.max_staleness=k >= 1`): a producer thread draws the
next steps' batches while the trainer trains, and no batch is trained on more than k policy
versions after the weights that sampled it.

Versions. The policy version is the number of training steps whose update is done (step s
trains policy version s - 1 and publishes version s; one step may hold several optimiser steps,
mu epochs times the mini-batches: the servers only ever see the weights between steps). The
producer draws step j's batch (the sampler's next prompts, generation, scoring, DAPO's refill:
the whole `sample_groups` call the trainer would make) only once the servers hold version
j - 1 - k or newer, so its staleness when step j trains it, (j - 1) - version, is at most k:
the producer waits for weights rather than run further ahead (`time/wait_for_weights_s`).
Each completion carries the version that sampled it (`ScoredRollout.policy_versions`); a batch
of several rounds (dynamic sampling) may span versions.

Weight changes and requests. A generation round (one `RolloutSource` call: one request per
prompt) and a weight sync take turns (`_turn`, `exclusive`): a sync waits for the round in
flight to finish, and a round waits while a sync is pending or running. So every completion is
sampled by exactly one version, no token comes from half-updated weights, a LoRA adapter name
stays loaded while requests name it, and the servers are resumed whenever a round can start.
The peers (TRL AsyncGRPO, prime-rl, SkyRL) instead pause the servers keeping the requests in
flight (`/pause?mode=keep`), so one completion can span two versions; that syncs sooner when
generation is much longer than an update, and is not implemented (docs/algorithms.md).

Determinism. The producer draws prompts from its own copy of the sampler, in step order, and
its vLLM seeds from a generator seeded with (seed, step): step j's prompts and seeds do not
depend on timing, and never touch the trainer thread's random state. Which version samples
them does depend on timing, so a run with k >= 1 is not bitwise reproducible; with k = 0 there
is no producer. The trainer's sampler is set to the position after each batch it takes, so
checkpoints record the trained batches' position: on resume, batches that were generated but
not trained are dropped and drawn again (same prompts and seeds, newer weights).

Held-out evaluation, like a sync, takes the producer's turn (`exclusive`): it runs on the
weights just synced, and a tokenizer is never used from two threads at once.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from grpo.batch import ScoredRollout
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource
from grpo.tasks.base import Row

# (prompts, generate) -> (batch, sampling stats): the trainer's step 1-3 with its sampler and
# rollout source replaced.
Sample = Callable[[Any, Callable[..., ScoredRollout]], tuple[ScoredRollout, dict[str, float]]]
SEED_STRIDE = 1_000_003  # step j of seed s draws its vLLM seeds from s * SEED_STRIDE + j


class Stopped(Exception):
    """The producer was closed while it waited."""


@dataclass
class Produced:
    """A batch drawn ahead, with what the trainer needs when it takes it."""

    step: int  # the step that trains it
    batch: ScoredRollout
    stats: dict[str, float]  # sample_groups' statistics
    sampler_state: dict[str, Any]  # the sampler's position after its prompts
    wait_for_weights_s: float  # seconds the producer waited for weights before drawing it


class Producer:
    """Draws the batches of steps `first_step`..`last_step` ahead on a thread (see the module
    docstring); `next(step)` hands them to the trainer in order, `publish(model)` syncs new
    weights between rounds. Use it as a context manager: the thread runs inside."""

    def __init__(
        self,
        sample: Sample,
        sampler: Any,
        source: RolloutSource,
        max_staleness: int,
        first_step: int,
        last_step: int,
        seed: int,
    ) -> None:
        self.sample, self.sampler, self.source = sample, sampler, source
        self.max_staleness, self.first_step, self.last_step = max_staleness, first_step, last_step
        self.seed = seed
        self.version = first_step - 1  # the version the servers hold (the restored policy)
        self._ready: deque[Produced] = deque()
        self._error: BaseException | None = None
        self._stopped = False
        self._generating = False  # a round is in flight
        self._pending = 0  # syncs and evaluations waiting for their turn
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        # Busy accounting, for the step's metrics.
        self._busy_s, self._round_start = 0.0, None  # generation seconds; a round's start
        self._last = (0.0, 0.0)  # (time, busy seconds) at the last metrics (or the start)
        self._trainer_wait_s = 0.0  # seconds the trainer waited in `next` since `metrics`
        self._taken: Produced | None = None  # the batch handed out last
        self._prompts: Any = None  # the producer's copy of the sampler (from `__enter__`)

    def __enter__(self) -> Producer:
        self._prompts = copy.deepcopy(self.sampler)  # the trainer's keeps the trained position
        self._last = (time.perf_counter(), 0.0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread once its round in flight is done (servers stay resumed)."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # ------------------------------------------------------------------------ producer thread
    def _run(self) -> None:
        prompts = self._prompts
        try:
            for step in range(self.first_step, self.last_step + 1):
                start = time.perf_counter()
                oldest = step - 1 - self.max_staleness  # the oldest version step may train on
                self._wait_for(lambda oldest=oldest: self.version >= oldest)
                waited = time.perf_counter() - start
                seeds = torch.Generator().manual_seed(self.seed * SEED_STRIDE + step)
                batch, stats = self.sample(prompts, self._generator(seeds))
                produced = Produced(step, batch, stats, prompts.state_dict(), waited)
                with self._changed:
                    self._ready.append(produced)
                    self._changed.notify_all()
        except Stopped:
            pass
        except BaseException as error:  # a lost server, a bug: raised again in the trainer
            with self._changed:
                self._error = error
                self._changed.notify_all()

    def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Wait until `ready()` (read under the lock); `Stopped` once the producer is closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopped or ready())
            if self._stopped:
                raise Stopped

    def _generator(self, seeds: torch.Generator) -> Callable[..., ScoredRollout]:
        """The rollout source as the producer calls it: each call one round in its turn, its
        vLLM seeds from `seeds`, its completions tagged with the version that sampled them."""

        def generate(rows: Sequence[Row], n: int, settings: SamplingSettings) -> ScoredRollout:
            settings = dataclasses.replace(settings, seed_generator=seeds)
            with self._turn() as version:
                batch = self.source(rows, n, settings)
            batch.policy_versions = torch.full((len(batch.rows),), version, dtype=torch.long)
            return batch

        return generate

    @contextmanager
    def _turn(self) -> Iterator[int]:
        """A generation round: waits while a sync or an evaluation is pending or running;
        yields the version the servers hold throughout."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopped or not self._pending)
            if self._stopped:
                raise Stopped
            self._generating, self._round_start = True, time.perf_counter()
            version = self.version
        try:
            yield version
        finally:
            with self._changed:
                self._busy_s += time.perf_counter() - self._round_start
                self._generating, self._round_start = False, None
                self._changed.notify_all()

    # ------------------------------------------------------------------------- trainer thread
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The trainer's turn: the round in flight finishes first, none starts meanwhile."""
        with self._changed:
            self._pending += 1
            self._changed.wait_for(lambda: not self._generating)
        try:
            yield
        finally:
            with self._changed:
                self._pending -= 1
                self._changed.notify_all()

    def publish(self, model: PreTrainedModel) -> float:
        """Sync `model`'s weights to the servers in the trainer's turn; the producer then
        samples the next version. Returns the sync's seconds (waiting for the round included)."""
        start = time.perf_counter()
        with self.exclusive():
            self.source.backend.sync(model)
            with self._changed:
                self.version += 1
                self._changed.notify_all()
        return time.perf_counter() - start

    def next(self, step: int) -> tuple[ScoredRollout, dict[str, float]]:
        """Step `step`'s batch and sampling statistics, once drawn; the trainer's sampler moves
        to the position after it. The producer's error, if it stopped on one, is raised here."""
        start = time.perf_counter()
        with self._changed:
            self._changed.wait_for(lambda: self._ready or self._error is not None)
            if self._error is not None and not self._ready:
                raise self._error
            produced = self._ready.popleft()
        self._trainer_wait_s += time.perf_counter() - start
        if produced.step != step:  # a bug, not a state a run can reach
            raise RuntimeError(f"step {step} was handed the batch drawn for {produced.step}")
        self.sampler.load_state_dict(produced.sampler_state)
        self._taken = produced
        return produced.batch, produced.stats

    def metrics(self, step: int) -> dict[str, float]:
        """The step's asynchrony metrics: its batch's staleness (policy version step - 1 minus
        each completion's), the seconds each side waited, and the fraction of the time since
        the last call that generation and training were busy."""
        produced, now = self._taken, time.perf_counter()
        versions = produced.batch.policy_versions
        staleness = (step - 1 - versions).double()
        with self._changed:
            busy = self._busy_s
            if self._round_start is not None:
                busy += now - self._round_start
        (then, busy_then), self._last = self._last, (now, busy)
        wall = max(now - then, 1e-9)
        waited, self._trainer_wait_s = self._trainer_wait_s, 0.0
        return {
            "rollout/staleness_mean": staleness.mean().item(),
            "rollout/staleness_max": staleness.max().item(),
            "rollout/version_min": float(versions.min()),
            "rollout/version_max": float(versions.max()),
            "time/wait_for_rollouts_s": waited,
            "time/wait_for_weights_s": produced.wait_for_weights_s,
            "time/generation_busy_fraction": min(1.0, (busy - busy_then) / wall),
            "time/training_busy_fraction": max(0.0, 1.0 - waited / wall),
        }
