"""The seed's prompt template and its chat-message form."""

from __future__ import annotations

from grpo.prompts import PROMPT_TEMPLATE, chat_messages, format_prompt

QUESTION = "What is 3 + {4}?"
EXPECTED = (
    "Question: What is 3 + {4}?\n\nPlease solve this step by step and provide your final answer "
    'in the format "#### [number]".\n\nAnswer:'
)


def test_format_prompt_fills_the_seed_template() -> None:
    assert format_prompt(QUESTION) == EXPECTED


def test_format_prompt_custom_template() -> None:
    assert format_prompt("2 + 2?", template="Q: {question}\nA:") == "Q: 2 + 2?\nA:"


def test_template_has_one_question_field() -> None:
    assert PROMPT_TEMPLATE.count("{question}") == 1
    assert PROMPT_TEMPLATE.endswith("Answer:")


def test_chat_messages_user_only() -> None:
    assert chat_messages(QUESTION) == [{"role": "user", "content": EXPECTED}]


def test_chat_messages_with_system() -> None:
    messages = chat_messages(QUESTION, system="You are a careful tutor.")
    assert messages == [
        {"role": "system", "content": "You are a careful tutor."},
        {"role": "user", "content": EXPECTED},
    ]
