"""Reward functions: each hybrid part, full totals by hand, the simpler rewards, and plain
functions as rewards (`reward=function`): their exact arguments, the rows' columns."""

from __future__ import annotations

import math

import pytest
from conftest import CONF_DIR, compose_config
from hydra.utils import instantiate

from grpo.tasks.rewards import (
    CombinedReward,
    CorrectnessReward,
    FinalAnswerFormatReward,
    FunctionReward,
    HybridReward,
    Reward,
    RewardError,
    RewardOutput,
    SoftOverlongPunishment,
)

TRUTH = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
GSM8K_STYLE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Then she sold 48+24 = 72 clips in total.\n"
    "#### 72"
)


def _score(reward: Reward, completion: str, answer: str = TRUTH) -> RewardOutput:
    """Score a single completion."""
    return reward([completion], [answer])


def _assert_parts_sum_to_total(output: RewardOutput) -> None:
    for index, total in enumerate(output.total):
        assert math.fsum(values[index] for values in output.parts.values()) == pytest.approx(total)


@pytest.mark.parametrize(
    ("part", "completion", "expected"),
    [
        ("correctness", "#### 7", 0.6),
        ("correctness", "The answer is 7", 0.6),
        ("correctness", "#### 8", 0.2),
        ("correctness", "I give up.", 0.3),
        ("length", "x" * 50, 0.0),
        ("length", "x" * 51, 0.2),
        ("math_indicators", "no math here", 0.0),
        ("math_indicators", "3 * 4", 0.1),
        ("math_indicators", "x = y", 0.1),
        ("math_indicators", "costs $5", 0.1),
        ("math_indicators", "20 %", 0.1),
        ("math_indicators", "half is 0.5", 0.1),
        ("math_indicators", "took 5 Hours", 0.1),
        ("math_indicators", "3 + 4 3 + 4 3 + 4", 0.1),
        ("math_indicators", "3 + 4 = 7", 0.2),
        ("math_indicators", "$1.5 * 2 = 3 hours, 20%", 0.5),
        ("reasoning", "First, add them.", 0.3),
        ("reasoning", "STEP 1: add", 0.3),
        ("reasoning", "Firstly, stepping back", 0.0),
        ("reasoning", "Add them.", 0.0),
        ("format", "#### 5", 0.15),
        ("format", "The answer is 5 #### 5", 0.15),
        ("format", "The answer is 5", 0.1),
        ("format", "\\boxed{5}", 0.1),
        ("format", "maybe 5", 0.0),
        ("format", "nothing", 0.0),
        ("numerical", "abc", 0.0),
        ("numerical", "a1", 0.1),
        ("calculation", "48 / 2 = 24", 0.1),
        ("calculation", "<<48/2=24>>", 0.1),
        ("calculation", "0.2 x 50 = 10", 0.1),
        ("calculation", "x = 5", 0.0),
        ("calculation", "3 + 4", 0.0),
        ("calculation", "24 = 24", 0.0),
    ],
)
def test_hybrid_part(part: str, completion: str, expected: float) -> None:
    assert _score(HybridReward(), completion).parts[part] == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        # correct 0.6 + length 0.2 + indicators 0.3 (operator, =, fraction 48/2) + reasoning 0.3
        # ("Then") + format 0.15 + numerical 0.1 + calculation 0.1
        (GSM8K_STYLE, "#### 72", 1.75),
        # wrong 0.2 + format 0.1 ("The answer is") + numerical 0.1
        ("The answer is 5.", TRUTH, 0.4),
        # no answer 0.3 + length 0.2 (69 characters, no numbers, no reasoning word)
        ("I am not sure how to solve this problem, sorry about that, my friend.", TRUTH, 0.5),
    ],
)
def test_hybrid_total(completion: str, answer: str, expected: float) -> None:
    output = _score(HybridReward(), completion, answer)
    assert output.total == [pytest.approx(expected)]
    _assert_parts_sum_to_total(output)


def test_hybrid_weights_are_configurable() -> None:
    reward = HybridReward(correct=2.0, hashes_format=1.0, max_math_indicators=0.15)
    parts = _score(reward, GSM8K_STYLE, "#### 72").parts
    assert parts["correctness"] == [2.0]
    assert parts["format"] == [1.0]
    assert parts["math_indicators"] == [0.15]


@pytest.mark.parametrize(
    ("completion", "answer", "strict", "expected"),
    [
        ("#### 7", TRUTH, False, 1.0),
        ("#### 7", TRUTH, True, 1.0),
        ("The answer is 7", TRUTH, False, 1.0),
        ("The answer is 7", TRUTH, True, 0.0),
        ("#### 1,200", "So 12 * 100 = 1200.\n#### 1,200", True, 1.0),
        ("#### 1200.0", "#### 1,200", True, 1.0),
        ("#### 8", TRUTH, False, 0.0),
        ("#### 7\n#### 8", TRUTH, False, 0.0),
        ("", TRUTH, False, 0.0),
        ("7", "7", False, 1.0),
    ],
)
def test_correctness_reward(completion: str, answer: str, strict: bool, expected: float) -> None:
    output = _score(CorrectnessReward(strict=strict), completion, answer)
    assert output == RewardOutput(total=[expected], parts={"correctness": [expected]})


def test_ground_truth_without_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="ground-truth answer 1: 'no number'"):
        CorrectnessReward()(["#### 7", "#### 7"], [TRUTH, "no number"])


def test_batch_size_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        CorrectnessReward()(["#### 7", "#### 7"], [TRUTH])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 + 4 = 7\n#### 7", 0.1),
        ("#### 7.\n\n", 0.1),
        ("#### 7\n#### 7\n#### 7", 0.0),
        ("The #### line comes last.\n#### 7", 0.0),
        ("#### 7\nDone.", 0.0),
        ("The answer is 7", 0.0),
        ("#### [number]", 0.0),
    ],
)
def test_final_answer_format_reward(completion: str, expected: float) -> None:
    assert _score(FinalAnswerFormatReward(), completion).parts == {"format": [expected]}


def test_final_answer_format_pays_even_when_wrong() -> None:
    assert _score(FinalAnswerFormatReward(weight=0.5), "#### 8").total == [0.5]


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0)],
)
def test_soft_overlong_punishment(length: int, expected: float) -> None:
    """L_max = 100, L_cache = 20: free up to 80 tokens, linear to -1 at 100, -1 beyond."""
    output = SoftOverlongPunishment(max_length=100, cache_length=20)(
        ["x"], [TRUTH], lengths=[length]
    )
    assert output.parts == {"overlong": [pytest.approx(expected)]}
    # Without max_length, L_max is the generation budget the call carries.
    budget = SoftOverlongPunishment(cache_length=20)(
        ["x"], [TRUTH], lengths=[length], max_new_tokens=100
    )
    assert budget.parts == output.parts


def test_soft_overlong_needs_lengths_and_a_budget() -> None:
    with pytest.raises(ValueError, match="needs the completion lengths"):
        SoftOverlongPunishment(max_length=100, cache_length=20)(["x"], [TRUTH])
    with pytest.raises(ValueError, match="needs a max_length"):
        SoftOverlongPunishment(cache_length=20)(["x"], [TRUTH], lengths=[3])


@pytest.mark.parametrize(("max_length", "cache_length"), [(100, 0), (100, 101)])
def test_soft_overlong_rejects_bad_buffer(max_length: int, cache_length: int) -> None:
    with pytest.raises(ValueError, match="cache_length"):
        SoftOverlongPunishment(max_length=max_length, cache_length=cache_length)


def test_combined_reward_weights_and_part_names() -> None:
    reward = CombinedReward(
        components={
            "correctness": CorrectnessReward(),
            "format": FinalAnswerFormatReward(weight=0.1),
            "hybrid": HybridReward(),
        },
        weights={"correctness": 2.0, "hybrid": 0.5},
    )
    output = reward([GSM8K_STYLE, "#### 5\n#### 5"], ["#### 72", "#### 72"])
    # correct: 2.0 * 1 + 0.1 + 0.5 * 1.75; gamed: 0 + 0 + 0.5 * (0.2 + 0.15 + 0.1)
    assert output.total == [pytest.approx(2.975), pytest.approx(0.225)]
    assert list(output.parts)[:3] == ["correctness", "format", "hybrid/correctness"]
    assert output.parts["hybrid/correctness"] == [pytest.approx(0.3), pytest.approx(0.1)]
    assert len(output.parts) == 2 + 7
    _assert_parts_sum_to_total(output)


def test_combined_reward_rejects_unknown_weight() -> None:
    with pytest.raises(ValueError, match="unknown reward components: \\['typo'\\]"):
        CombinedReward({"correctness": CorrectnessReward()}, {"typo": 1.0})


def test_non_finite_reward_names_class_index_and_text() -> None:
    completions = ["#### 7", "First " + "y" * 300]
    with pytest.raises(ValueError) as error:
        HybridReward(reasoning=float("nan"))(completions, [TRUTH, TRUTH])
    message = str(error.value)
    assert message.startswith("HybridReward gave non-finite reward nan for completion 1: ")
    assert repr(completions[1][:200]) in message
    assert "y" * 195 not in message


def test_non_finite_combined_weight_is_caught() -> None:
    reward = CombinedReward({"correctness": CorrectnessReward()}, {"correctness": math.inf})
    with pytest.raises(ValueError, match="CombinedReward .* for completion 0: '#### 8'"):
        reward(["#### 8"], [TRUTH])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hybrid", {"correctness": [0.6, 0.2], "format": [0.15, 0.15]}),
        ("correctness", {"correctness": [1.0, 0.0]}),
        ("quickstart", {"correctness": [1.0, 0.0], "format": [0.1, 0.0]}),
        ("dapo", {"correctness": [1.0, 0.0], "overlong": [0.0, -0.5]}),
    ],
)
def test_reward_configs_instantiate(name: str, expected: dict[str, list[float]]) -> None:
    # The dapo reward's L_max is the generation budget of the call (rollout.max_new_tokens).
    reward = instantiate(compose_config(f"reward={name}").reward)
    texts = ["3 + 4 = 7\n#### 7", "#### 8\n#### 8"]
    output = reward(texts, [TRUTH, TRUTH], lengths=[10, 448], max_new_tokens=452)
    for part, values in expected.items():
        assert output.parts[part] == [pytest.approx(value) for value in values]
    _assert_parts_sum_to_total(output)


class _FailsOnEmpty(CorrectnessReward):
    """A user reward with a bug: it cannot handle an empty completion."""

    def parts(self, batch):
        if any(not text for text in batch.texts):
            raise IndexError("empty completion")
        return super().parts(batch)


def test_a_reward_that_raises_names_itself_and_the_sample() -> None:
    with pytest.raises(
        RewardError, match=r"_FailsOnEmpty failed: empty completion; on completion 1 ''"
    ):
        _FailsOnEmpty()(["#### 5", "", "#### 3"], ["#### 5"] * 3)


# ------------------------------------------------------------------------ plain functions
FUNCTIONS = """
CALLS = []


def record(completions, answers, prompts, **columns):
    CALLS.append({"completions": completions, "answers": answers, "prompts": prompts, **columns})
    return [len(text) / 10 for text in completions]


def only_texts(completions):
    return [1.0 if "7" in text else 0.0 for text in completions]


def needs_unit(completions, unit):
    return [0.5 if u in text else 0.0 for text, u in zip(completions, unit)]


def too_few(completions, **kwargs):
    return [1.0]


def not_numbers(completions, **kwargs):
    return ["high" for _ in completions]
"""


@pytest.fixture
def functions(tmp_path, monkeypatch):
    """A module of reward functions, importable as `reward_functions`."""
    (tmp_path / "reward_functions.py").write_text(FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "reward_functions", raising=False)
    return __import__("reward_functions")


def test_a_function_gets_completions_answers_prompts_and_the_columns_by_name(functions):
    reward = FunctionReward("reward_functions.record")
    columns = [{"unit": "km", "level": 1}, {"unit": "kg", "level": 2}]
    output = reward(["#### 7", "#### 12"], [TRUTH, TRUTH], ["p1", "p2"], [3, 4], 64, columns)
    assert output.parts == {"record": [0.6, 0.7]} and output.total == [0.6, 0.7]
    assert functions.CALLS == [
        {
            "completions": ["#### 7", "#### 12"],
            "answers": [TRUTH, TRUTH],
            "prompts": ["p1", "p2"],
            "unit": ["km", "kg"],
            "level": [1, 2],
        }
    ]
    reward(["x"], [TRUTH])  # a direct call: no prompts, no columns
    assert functions.CALLS[-1] == {"completions": ["x"], "answers": [TRUTH], "prompts": None}


def test_a_function_gets_only_the_arguments_it_names(functions):
    columns = [{"unit": "km"}, {"unit": "kg"}]
    texts = ["7 km", "12 km"]
    assert FunctionReward("reward_functions.only_texts", name="seven")(
        texts, [TRUTH] * 2, columns=columns
    ).parts == {"seven": [1.0, 0.0]}
    needs = FunctionReward("reward_functions.needs_unit")
    assert needs(texts, [TRUTH] * 2, columns=columns).total == [0.5, 0.0]
    with pytest.raises(RewardError, match=r"needs unit: neither an argument nor a column of the "):
        needs(texts, [TRUTH] * 2)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("too_few", r"reward_functions.too_few returned \[1.0\], not one number per completion"),
        ("not_numbers", r"returned 'high' for completion 0: not a number"),
    ],
)
def test_a_function_must_return_one_number_per_completion(functions, name, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(f"reward_functions.{name}")(["a", "b"], [TRUTH] * 2)


def test_a_column_may_not_hide_an_argument(functions):
    reward = FunctionReward("reward_functions.record")
    with pytest.raises(RewardError, match="the rows' column 'answers' hides an argument"):
        reward(["a"], [TRUTH], columns=[{"answers": "x"}])


def test_a_function_that_cannot_be_imported_is_named_with_its_key():
    with pytest.raises(ValueError, match=r"^function='no_such_module.f': cannot import"):
        FunctionReward("no_such_module.f")
    with pytest.raises(ValueError, match=r"^function='math.no_such': module 'math' has no"):
        FunctionReward("math.no_such")
    with pytest.raises(ValueError, match=r"^function='math.pi': not callable"):
        FunctionReward("math.pi")


def test_a_function_is_a_part_of_the_combined_reward(functions):
    reward = CombinedReward(
        {"correctness": CorrectnessReward(), "unit": FunctionReward("reward_functions.needs_unit")},
        {"unit": 2.0},
    )
    output = reward(["#### 7 km", "#### 8 kg"], [TRUTH] * 2, columns=[{"unit": "km"}] * 2)
    assert output.parts == {"correctness": [1.0, 0.0], "unit": [1.0, 0.0]}
    assert output.total == [2.0, 0.0]


def test_reward_function_yaml_builds_its_example():
    reward = instantiate(compose_config("reward=function").reward)
    assert reward.name == "exact_match"
    assert reward([" Paris\n", "Rome"], ["Paris", "Paris"]).parts == {"exact_match": [1.0, 0.0]}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "reward").glob("*.yaml")))
def test_the_rows_columns_change_no_reward_that_does_not_read_them(name):
    texts, answers = ["3 + 4 = 7\n#### 7", "#### 8\n#### 8"], [TRUTH, TRUTH]
    reward = instantiate(compose_config(f"reward={name}").reward)
    plain = reward(texts, answers, ["p", "p"], [10, 448], 452)
    assert reward(texts, answers, ["p", "p"], [10, 448], 452, [{"level": 1}, {"level": 2}]) == plain


def test_columns_are_one_mapping_per_completion():
    with pytest.raises(ValueError, match="2 completions but 1 columns"):
        CorrectnessReward()(["#### 7", "#### 8"], [TRUTH, TRUTH], columns=[{"level": 1}])
