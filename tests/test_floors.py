"""`scripts/floors.py`: each phase floor against hand arithmetic on a toy model and step.

The toy: B = 100 layer parameters, H = 10 head parameters, one layer with one head of size 2
(one key/value head), so A(s, e) = 4 * 1 * 1 * 2 * (s+1 + ... + e) = 8 (s+1 + ... + e), and a
token position's keys and values take 2 * 1 * 1 * 2 * 4 = 16 bytes. One prompt of 3 tokens,
G = 2 completions of 2 tokens. The machine does 1 FLOP and moves 1 byte per second, so a
floor in seconds is max(FLOPs, bytes).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def floors():
    spec = importlib.util.spec_from_file_location("floors", REPO / "scripts" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["floors"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["floors"]


def toy(floors, **changes):
    shape = dict(body=100, head=10, layers=1, heads=1, kv_heads=1, head_dim=2, trainable=110)
    return floors.Model(**{**shape, **changes})


def test_forward_counts_a_shared_prompt_once_and_feeds_no_last_token(floors):
    step = floors.Step(prompts=(3,), completions=(2, 2))
    linear, attention = floors.forward_flops(toy(floors), step)
    # fed: 3 prompt tokens once + (2 - 1) per row = 5; scored: 2 per row = 4
    assert linear == 2 * 100 * 5 + 2 * 10 * 4  # 1080
    # the prompt: 8 (1 + 2 + 3) once; each row's fed completion token at position 4: 8 * 4
    assert attention == 8 * 6 + 2 * 8 * 4  # 112


def test_generation_prefill_then_bandwidth_bound_decode(floors):
    machine = floors.Machine(flops=1.0, bandwidth=1.0)
    step = floors.Step(prompts=(3,), completions=(2, 2))
    # prefill: 2 * 100 * 3 + 2 * 10 (the head at the last position) + A(0, 3) = 668 FLOPs,
    # more than the 4 * 110 = 440 weight bytes
    prefill = 668
    # one decode step (s = 1), both rows at context 4: FLOPs 2 * 110 * 2 + 2 * 8 * 4 = 504;
    # bytes 440 + 16 * (4 + 4) = 568, the larger
    assert floors.generation(toy(floors), step, machine) == prefill + 568


def test_generation_stops_counting_finished_rows(floors):
    machine = floors.Machine(flops=1.0, bandwidth=math.inf)
    step = floors.Step(prompts=(3,), completions=(1, 3))
    # decode steps s = 1, 2; only the 3-token row decodes, at contexts 4 and 5
    decode = (2 * 110 + 8 * 4) + (2 * 110 + 8 * 5)
    assert floors.generation(toy(floors), step, machine) == 668 + decode


def test_scoring_update_and_sync(floors):
    machine = floors.Machine(flops=1.0, bandwidth=1.0)
    step = floors.Step(prompts=(3,), completions=(2, 2))
    forward = 1080 + 112
    assert floors.scoring(toy(floors), step, machine, forwards=2) == 2 * forward
    # full fine-tuning: 3 x the forward, then AdamW's 28 bytes per parameter
    assert floors.update(toy(floors), step, machine) == 3 * forward + 28 * 110
    # LoRA with 5 adapter parameters: 2 x linear + 3 x attention + 6 * 5 per fed token (5)
    lora = toy(floors, trainable=5, adapter=5)
    assert floors.update(lora, step, machine) == 2 * 1080 + 3 * 112 + 6 * 5 * 5 + 28 * 5
    # the sync reads and writes each fp32 parameter handed over: 8 bytes
    assert floors.sync(toy(floors, synced=110), machine) == 880
    assert floors.sync(toy(floors), machine) == 0


def test_phase_floors_add_up_to_the_step(floors):
    machine = floors.Machine(flops=2e11, bandwidth=1.5e10)
    step = floors.Step(prompts=(80, 78), completions=(64,) * 8)
    phases = floors.phase_floors(toy(floors, synced=110), step, machine)
    parts = ("generate", "score_ref", "update", "sync")
    assert phases["step"] == pytest.approx(sum(phases[k] for k in parts))
    assert all(phases[k] > 0 for k in parts)
