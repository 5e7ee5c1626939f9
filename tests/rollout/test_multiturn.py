"""The multi-turn driver (grpo.rollout.multiturn) with a deterministic test environment on the
tiny model: observation ids appended as the tokenizer makes them alone, the masks and log-probs
of model and environment tokens, trajectories of different turn counts in one batch, the
budgets and what they cut; continuation prompts on the in-process backends (the stop rule
around a fence spanning token boundaries); the single-turn environment's path unchanged; and
training end to end (2 steps, dynamic sampling, every policy loss and advantage estimator, resume,
DDP with 2 processes, a Hydra multirun).
vLLM's continuations are tested in test_vllm_engine.py and test_vllm_server.py."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    compose_config,
    generate,
    read_metrics,
    step_lines,
    tiny_policy,
    tiny_task,
)
from test_distributed import TINY_DDP, torchrun, torchrun_env

from grpo.actor.logprobs import token_logprobs
from grpo.actor.update import normalisers
from grpo.algorithm.advantages import ADVANTAGE_ESTIMATORS
from grpo.algorithm.policy_losses import POLICY_LOSSES
from grpo.batch import ScoredRollout, concat, take
from grpo.environments.base import DROPPED, ENVIRONMENTS, Environment, Episode
from grpo.rollout.backends import BACKENDS
from grpo.rollout.multiturn import run_trajectories, turn_stop_pattern
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import RolloutSource, render_prompts, tokenize_prompts
from grpo.run.config import ConfigError, validate_config
from grpo.run.records import compare_metrics
from grpo.run.servers import server_args
from grpo.tasks.rewards import HybridReward

OUTPUT = "\n```output\n42\n```\n"  # what the test tool answers (ToRL's output fence)


class TallyEpisode(Episode):
    """Answers its first `calls` turns with `observation`, then ends; remembers what it saw."""

    def __init__(self, calls: int, observation: str) -> None:
        self.calls, self.observation = calls, observation
        self.turns: list[str] = []
        self.observations: list[str] = []

    def step(self, turn: str) -> str | None:
        self.turns.append(turn)
        if len(self.observations) == self.calls:
            return None
        self.observations.append(self.observation)
        return self.observation

    def stats(self) -> dict[str, float]:
        return {"tool_calls": float(len(self.observations)), "tool_errors": 0.0}


@ENVIRONMENTS.register("test_tally")
class Tally(Environment):
    """A model turn ends at its first digit (or what `turn_stop` matches); a row's episodes
    answer (the length of its question mod `max_turns`) of their turns, or `calls` of them when
    given: so one batch holds trajectories of different turn counts, and a row's depend on the
    row alone (resume)."""

    def __init__(
        self,
        *,
        max_turns: int = 3,
        observation: str = OUTPUT,
        calls: int | None = None,
        turn_stop: str = r"\d",
    ) -> None:
        self.max_turns, self.observation, self.calls = max_turns, observation, calls
        self.turn_stop = turn_stop

    def reset(self, row) -> Episode:
        calls = self.calls if self.calls is not None else len(row["question"]) % self.max_turns
        return TallyEpisode(calls, self.observation)


@ENVIRONMENTS.register("test_fixed_turns")
class FixedTurns(Environment):
    """Three turns always, not a setting: refused (the budgets read environment.max_turns)."""

    max_turns = 3

    def reset(self, row) -> Episode:
        return TallyEpisode(2, OUTPUT)


def drive(policy, env: Tally, n: int = 3, backend: str = "lean", engine=None, **sampling):
    """The driver on 2 prompts of the tiny task, `n` trajectories each, seeded, with `backend`
    (or a built `engine`)."""
    defaults = {"max_new_tokens": 8, "max_prompt_length": 256, "max_total_tokens": 64}
    settings = SamplingSettings(**{**defaults, **sampling})
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    ids, mask = tokenize_prompts(policy.tokenizer, prompts, 256, "cpu")
    episodes = [env.reset(row) for row in task.train[:2] for _ in range(n)]
    torch.manual_seed(4)
    engine = engine or BACKENDS[backend](policy, settings)
    rollout, stats = run_trajectories(
        engine, policy.tokenizer, ids, mask, n, settings, episodes, env.max_turns, env.turn_stop
    )
    return rollout, stats, episodes


def segments(row_mask: list[int], row_model: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, from_model) runs of one completion's tokens."""
    runs: list[tuple[int, int, int]] = []
    for i, (m, model) in enumerate(zip(row_mask, row_model, strict=True)):
        if not m:
            break
        if runs and runs[-1][2] == model:
            runs[-1] = (runs[-1][0], i + 1, model)
        else:
            runs.append((i, i + 1, model))
    return runs


def test_observations_are_appended_as_their_own_ids_and_masked_out_of_the_loss():
    trajectories_hold_their_ids_masks_and_logprobs(tiny_policy())


def trajectories_hold_their_ids_masks_and_logprobs(policy, engine=None) -> None:
    """The driver on the lean decoder (or a built `engine`): observation ids, masks, log-probs
    and turn counts, as the first test says; shared with the vLLM tests."""
    tok = policy.tokenizer
    sampling = {"keep_logprobs": True, "temperature": 1.0}
    rollout, stats, episodes = drive(policy, Tally(), engine=engine, **sampling)
    alone = tok(OUTPUT, add_special_tokens=False).input_ids
    assert rollout.loss_mask is not None and rollout.sampling_logprobs is not None
    for row, episode in enumerate(episodes):
        runs = segments(rollout.completion_mask[row].tolist(), rollout.loss_mask[row].tolist())
        ids = rollout.completion_ids[row].tolist()
        observed = [ids[a:b] for a, b, model in runs if not model]
        assert observed == [alone] * len(episode.observations)  # never re-tokenised in context
        model_turns = [tok.decode(ids[a:b], skip_special_tokens=True) for a, b, m in runs if m]
        assert model_turns[: len(episode.turns)] == episode.turns  # each turn as it was stepped
        assert stats["turns"][row] == len(model_turns) == len(episode.observations) + 1
        assert rollout.texts[row] == tok.decode(
            rollout.completion_ids[row][rollout.completion_mask[row].bool()],
            skip_special_tokens=True,
        )
        assert OUTPUT.strip() in rollout.texts[row] or not episode.observations
    assert len(set(stats["turns"])) > 1  # trajectories of different turn counts in one batch
    assert stats["tool_calls"] == [float(len(e.observations)) for e in episodes]
    env_tokens = rollout.completion_mask.bool() & ~rollout.loss_mask.bool()
    assert env_tokens.any()
    assert (rollout.sampling_logprobs[env_tokens] == 0).all()
    with torch.no_grad():
        train_logp, _ = token_logprobs(policy.model, rollout, 1.0)
    assert (train_logp[env_tokens] == 0).all()
    model = rollout.model_mask.bool()
    # Each turn sampled from the trajectory so far: the training forward pass over the whole
    # trajectory gives the sampler's log-probs at the model's tokens.
    torch.testing.assert_close(
        rollout.sampling_logprobs[model], train_logp[model], atol=1e-4, rtol=0
    )


def test_a_turn_ends_at_the_task_stop_or_the_environments_and_is_cut_at_its_budget():
    assert turn_stop_pattern("####", None) == "(?:####)"
    assert turn_stop_pattern(None, None) is None
    combined = turn_stop_pattern(r"#### \d+\n", r"```output\n")
    assert re.search(combined, "x = 1\n```output\n") and re.search(combined, "#### 7\n")
    policy = tiny_policy()
    tok = policy.tokenizer
    rollout, stats, episodes = drive(policy, Tally(), max_new_tokens=8)
    ends = {"eos": 0, "stop": 0, "cut": 0}
    for row, episode in enumerate(episodes):
        runs = segments(rollout.completion_mask[row].tolist(), rollout.loss_mask[row].tolist())
        ids = rollout.completion_ids[row].tolist()
        turns = [ids[a:b] for a, b, model in runs if model]
        for turn in turns[: len(episode.turns)]:  # stepped: ended at EOS or right at a digit
            text, before = (tok.decode(t, skip_special_tokens=True) for t in (turn, turn[:-1]))
            at_stop = re.search(r"\d", text) and not re.search(r"\d", before)
            assert turn[-1] == tok.eos_token_id or at_stop
            ends["eos" if turn[-1] == tok.eos_token_id else "stop"] += 1
        cut = len(turns) > len(episode.turns)  # the last turn reached its budget: not stepped
        if cut:
            assert len(turns[-1]) == 8 and not re.search(r"\d", tok.decode(turns[-1][:-1]))
            ends["cut"] += 1
        assert bool(rollout.truncated[row]) == cut
    assert ends["stop"] and ends["cut"]


def test_an_observation_past_the_total_budget_is_cut_and_the_trajectory_truncated():
    policy = tiny_policy()
    long = " the tool printed a long line of text that goes on and on" * 4
    total = 8 + 12
    rollout, stats, episodes = drive(policy, Tally(observation=long), max_total_tokens=total)
    alone = policy.tokenizer(long, add_special_tokens=False).input_ids
    assert len(alone) > 12
    for row, episode in enumerate(episodes):
        length = int(rollout.lengths[row])
        assert length <= total
        if episode.observations:  # its observation did not fit: cut to what was left
            runs = segments(rollout.completion_mask[row].tolist(), rollout.loss_mask[row].tolist())
            a, b, _ = runs[1]
            assert rollout.completion_ids[row].tolist()[a:b] == alone[: b - a]
            assert length == total and bool(rollout.truncated[row])
            assert stats["turns"][row] == 1


def test_the_turn_limit_drops_an_observation_asked_for_and_marks_truncation():
    policy = tiny_policy()
    rollout, stats, episodes = drive(policy, Tally(max_turns=2, calls=5), max_new_tokens=8)
    for row, episode in enumerate(episodes):
        assert stats["turns"][row] <= 2
        assert len(episode.observations) == len(episode.turns)
        appended = (~rollout.loss_mask[row].bool() & rollout.completion_mask[row].bool()).any()
        assert appended == (stats["turns"][row] == 2)  # the second turn's observation dropped
        assert bool(rollout.truncated[row])  # cut at a budget or at the turn limit


def test_stats_travel_with_take_and_concat():
    policy, task = tiny_policy(), tiny_task()
    lean = BACKENDS["lean"](policy, settings())
    source = RolloutSource(task, policy, lean, HybridReward(), Tally())
    torch.manual_seed(0)
    batch = source(task.train[:2], 3, settings(max_total_tokens=32))
    assert isinstance(batch, ScoredRollout)
    assert set(batch.stats) == {"turns", "tool_calls", "tool_errors"}
    back = concat([take(batch, [3, 4, 5]), take(batch, slice(0, 3))])
    assert back.stats["turns"] == batch.stats["turns"][3:] + batch.stats["turns"][:3]
    assert back.rollout.loss_mask.shape[0] == 6


def settings(**fields) -> SamplingSettings:
    return SamplingSettings(**{"max_new_tokens": 8, "max_prompt_length": 256, **fields})


def test_the_single_turn_environment_is_the_one_backend_call():
    """`environment=single_turn`: the source's rollout is the backend's, bit for bit, and
    carries no loss mask and no stats."""
    policy = tiny_policy()
    task = tiny_task()
    source = RolloutSource(task, policy, BACKENDS["lean"](policy, settings()), HybridReward())
    torch.manual_seed(0)
    scored = source(task.train[:2], 2, settings())
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    torch.manual_seed(0)
    direct = generate(policy, prompts, 2, max_new_tokens=8)
    assert torch.equal(scored.rollout.completion_ids, direct.completion_ids)
    assert scored.rollout.loss_mask is None and scored.stats == {}


@pytest.mark.parametrize("backend", ["lean", "transformers"])
def test_a_continuation_stops_right_after_a_fence_spanning_token_boundaries(backend):
    """Greedy: a prompt that ends `k` tokens into the model's own greedy completion continues
    it, token for token, and stops right after a 'fence' (the text of its next 3 tokens, so the
    match needs all three)."""
    continuation_stops_after_the_fence(tiny_policy(), backend)


def continuation_stops_after_the_fence(policy, backend: str | None = None, engine=None) -> None:
    """The fence test on `backend` (or a built `engine`); shared with the vLLM tests."""
    tok = policy.tokenizer
    task = tiny_task()
    prompt = render_prompts(tok, task, task.train[:1], False)
    greedy = {"do_sample": False, "max_new_tokens": 16}
    kind = {"backend": backend} if engine is None else {"engine": engine}
    first = generate(policy, prompt, 1, **kind, **greedy)
    ids = first.completion_ids[0][first.completion_mask[0].bool()].tolist()
    k = 4
    fence = tok.decode(ids[k : k + 3], skip_special_tokens=True)
    assert all(tok.decode([t], skip_special_tokens=True) for t in ids[k : k + 3])
    before = tok.decode(ids[:k], skip_special_tokens=True)
    assert not re.search(re.escape(fence), tok.decode(ids[k : k + 2], skip_special_tokens=True))
    prompt_ids, _ = tokenize_prompts(tok, prompt, 256, "cpu")
    longer = torch.tensor([prompt_ids[0].tolist() + ids[:k]])
    rollout = (engine or BACKENDS[backend](policy, settings())).generate(
        longer, torch.ones_like(longer), 1, settings(stop_pattern=re.escape(fence), **greedy)
    )
    turn = rollout.completion_ids[0][rollout.completion_mask[0].bool()].tolist()
    assert turn == ids[k : k + 3] and not rollout.truncated[0]
    assert rollout.texts[0].endswith(fence) and before + rollout.texts[0] in first.texts[0]


def test_bad_environment_settings_are_refused_naming_the_key():
    cases = [
        (("environment.name=test_tally", "+environment.max_turns=0"), "environment.max_turns=0"),
        (("rollout.max_total_tokens=4",), "rollout.max_total_tokens=4"),
        (("rollout.max_total_tokens=0",), "rollout.max_total_tokens=0"),
        (("environment.name=nope",), "environment.name='nope'"),
        (("+environment.max_turns=2",), "environment.max_turns: not a setting"),
        (("environment.name=test_fixed_turns",), "environment.name='test_fixed_turns': an env"),
        (tally("environment.max_turns=two"), "environment.max_turns='two': must be >= 1"),
        (
            tally("rollout.backend=vllm", "rollout.vllm.tensor_parallel_size=2"),
            "rollout.vllm.tensor_parallel_size=2: the ranks of an engine",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as error:
            validate_config(compose_config(*TINY, *overrides))
        assert message in str(error.value), str(error.value)


def tally(*overrides: str) -> tuple[str, ...]:
    """Overrides: training with the test environment, up to 3 turns of at most 8 tokens, each
    ending at its first letter or digit, the first two answered."""
    return (
        "environment.name=test_tally",
        "+environment.max_turns=3",
        "+environment.calls=2",
        "+environment.turn_stop='[a-z0-9]'",
        *overrides,
    )


def test_engines_hold_the_first_prompt_and_a_whole_trajectory():
    """vLLM's max_model_len (engine and servers): max_prompt_length + the trajectory budget, which
    is max_new_tokens for one turn (as before) and max_turns turns of it unless
    rollout.max_total_tokens says."""
    lengths = [
        server_args(compose_config(*TINY, *overrides), "folder")["max_model_len"]
        for overrides in ((), tally(), tally("rollout.max_total_tokens=40"))
    ]
    assert lengths == [256 + 8, 256 + 3 * 8, 256 + 40]


def test_two_steps_train_with_env_metrics_samples_and_eval(tiny_train):
    run_dir, _ = tiny_train(*tally("eval.every=2", "logging.samples_every=1"))
    steps = step_lines(run_dir)
    assert len(steps) == 2
    for line in steps:
        assert 1 <= line["env/turns"] <= 3 and "env/tool_calls" in line
        assert 0 <= line["env/used_tool"] <= 1
    last = read_metrics(run_dir)[-1]
    for key in ("eval/env/turns", "eval/env/used_tool", "eval/accuracy_with_tool"):
        assert key in last
    samples = (run_dir / "samples.jsonl").read_text()
    assert "```output" in samples and '"env"' in samples


@pytest.mark.parametrize("loss", [name for name in POLICY_LOSSES if name != "clip"])
def test_every_other_policy_loss_trains_with_dynamic_sampling(tiny_train, loss):
    run_dir, _ = tiny_train(
        *tally(f"algorithm/policy_loss={loss}", "algorithm.dynamic_sampling.enabled=true")
    )
    assert len(step_lines(run_dir)) == 2


@pytest.mark.parametrize("estimator", [name for name in ADVANTAGE_ESTIMATORS if name != "grpo"])
def test_every_other_advantage_estimator_trains_multi_turn(tiny_train, estimator):
    run_dir, _ = tiny_train(*tally(f"algorithm/advantage={estimator}"))
    assert len(step_lines(run_dir)) == 2


def test_a_hydra_multirun_of_multi_turn_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, __file__, "-m", *TINY, *tally(), "seed=1,2", f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=REPO, env=torchrun_env(), check=True, capture_output=True, timeout=600)
    jobs = sorted(p.parent for p in sweep.glob("*/.hydra"))
    assert [job.name for job in jobs] == ["0", "1"]
    for job in jobs:
        lines = step_lines(job)
        assert len(lines) == 2 and all("env/turns" in line for line in lines)


def test_a_multi_turn_run_resumes_where_it_stopped(tiny_train):
    whole, _ = tiny_train(*tally("trainer.max_steps=3", "trainer.save_every=1"), name="whole")
    part, _ = tiny_train(*tally("trainer.max_steps=2", "trainer.save_every=1"), name="part")
    resumed, _ = tiny_train(
        *tally("trainer.max_steps=3", "trainer.save_every=1", "trainer.resume=auto"),
        name="part",
    )
    assert compare_metrics(whole, resumed) == []


def test_ddp_with_two_processes_trains_multi_turn(tmp_path):
    run_dir = tmp_path / "run"
    torchrun(2, __file__, *TINY_DDP, *tally(), f"hydra.run.dir={run_dir}")
    lines = step_lines(run_dir)
    assert len(lines) == 2 and all("env/turns" in line for line in lines)


if __name__ == "__main__":  # a rank started by torchrun: `python -m grpo.train`, Tally registered
    import runpy

    runpy.run_module("grpo.train", run_name="__main__", alter_sys=True)


class DroppingEpisode(TallyEpisode):
    """A Tally episode that asks to be left out of the loss when it answered any turn."""

    def stats(self) -> dict[str, float]:
        return super().stats() | {DROPPED: float(bool(self.observations))}


def test_dropped_trajectories_leave_the_loss_and_keep_their_tokens():
    policy, env = tiny_policy(), Tally(max_turns=3, calls=None)
    kept, _, episodes = drive(policy, env)
    torch.manual_seed(4)
    dropping = [DroppingEpisode(e.calls, e.observation) for e in episodes]
    task = tiny_task()
    prompts = render_prompts(policy.tokenizer, task, task.train[:2], False)
    ids, mask = tokenize_prompts(policy.tokenizer, prompts, 256, "cpu")
    settings = SamplingSettings(max_new_tokens=8, max_prompt_length=256, max_total_tokens=64)
    rollout, stats = run_trajectories(
        BACKENDS["lean"](policy, settings),
        policy.tokenizer,
        ids,
        mask,
        3,
        settings,
        dropping,
        env.max_turns,
        env.turn_stop,
    )
    dropped = torch.tensor(stats[DROPPED]).bool()
    assert dropped.any() and not dropped.all()  # the batch holds both kinds
    assert torch.equal(rollout.completion_ids, kept.completion_ids)  # same trajectories
    assert not rollout.model_mask[dropped].any()  # out of the loss: no token, no sequence
    assert torch.equal(rollout.model_mask[~dropped], kept.model_mask[~dropped])
    assert normalisers(rollout.model_mask.bool())["num_sequences"] == int((~dropped).sum())
