"""Turning instruction records into model inputs: chat template, response-only labels.

Alpaca records (instruction, input, output) become a user turn and an assistant turn; chat
records (messages) are used as they are. The loss is computed only on assistant tokens: prompt
tokens get the label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# Used only when a tokenizer has no chat template of its own (the tiny test tokenizer, base models).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a record, ending with the reference assistant turn."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    user = record["instruction"].strip()
    extra = (record.get("input") or "").strip()
    if extra:
        user = f"{user}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _render(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    template = None if tok.chat_template else FALLBACK_TEMPLATE
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def prompt_text(tok: PreTrainedTokenizerBase, record: dict[str, Any]) -> str:
    """The prompt a model sees at generation time: everything before the last assistant turn."""
    return _render(tok, to_messages(record)[:-1], add_generation_prompt=True)


def reference(record: dict[str, Any]) -> str:
    """The reference answer: the last assistant turn."""
    return to_messages(record)[-1]["content"]


def last_user_turn(record: dict[str, Any]) -> str:
    users = [m["content"] for m in to_messages(record) if m["role"] == "user"]
    return users[-1] if users else ""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode(tok: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int) -> Encoded:
    """Token ids and labels for one record; only assistant turns are labelled.

    Each assistant turn is found by rendering the conversation up to it with and without the
    turn, and tokenizing the two pieces separately (so a BPE merge across the boundary can never
    shift the mask). Truncation keeps the start; an example whose labels are all cut off has
    ``label_tokens == 0`` and is skipped by the caller.
    """
    messages = to_messages(record)
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], add_generation_prompt=True)
        full = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError("the chat template is not prefix-consistent; cannot mask prompt tokens")
        p_ids = tok(prompt[len(rendered) :], add_special_tokens=False)["input_ids"]
        c_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids += p_ids + c_ids
        labels += [IGNORE_INDEX] * len(p_ids) + c_ids
        rendered = full
    return Encoded(ids[:max_length], labels[:max_length])
