"""The seed's GSM8K prompt, as plain text or as chat messages."""

from __future__ import annotations

PROMPT_TEMPLATE = (
    "Question: {question}\n\n"
    'Please solve this step by step and provide your final answer in the format "#### [number]".'
    "\n\nAnswer:"
)


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """Fill ``template`` with ``question``."""
    return template.format(question=question)


def chat_messages(
    question: str, template: str = PROMPT_TEMPLATE, system: str | None = None
) -> list[dict[str, str]]:
    """The same prompt as chat messages for a tokenizer's ``apply_chat_template``.

    The filled template is the user message, preceded by a system message when ``system`` is set.
    """
    user = {"role": "user", "content": format_prompt(question, template)}
    if system is None:
        return [user]
    return [{"role": "system", "content": system}, user]
