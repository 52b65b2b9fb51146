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


def segments(tok: PreTrainedTokenizerBase, record: dict[str, Any]) -> list[tuple[str, str]]:
    """(prompt text, assistant text) per assistant turn, exactly the pieces :func:`encode` tokenizes.

    Each assistant turn is found by rendering the conversation up to it with and without the
    turn; the two pieces are tokenized separately (so a BPE merge across the boundary can never
    shift the mask).
    """
    messages = to_messages(record)
    pieces: list[tuple[str, str]] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], add_generation_prompt=True)
        full = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError("the chat template is not prefix-consistent; cannot mask prompt tokens")
        pieces.append((prompt[len(rendered) :], full[len(prompt) :]))
        rendered = full
    return pieces


def encode(tok: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int) -> Encoded:
    """Token ids and labels for one record; only assistant turns are labelled.

    Truncation keeps the start; an example whose labels are all cut off has
    ``label_tokens == 0`` and is skipped by the caller.
    """
    ids: list[int] = []
    labels: list[int] = []
    for prompt, completion in segments(tok, record):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"]
        ids += p_ids + c_ids
        labels += [IGNORE_INDEX] * len(p_ids) + c_ids
    return Encoded(ids[:max_length], labels[:max_length])


def token_lengths(tok: PreTrainedTokenizerBase, pieces: list[list[tuple[str, str]]]) -> list[int]:
    """Untruncated length of each example given its :func:`segments`, tokenized in one batch.

    Equals ``len(encode(tok, record, inf).input_ids)`` (each piece is tokenized on its own either
    way), at a fraction of the cost on large datasets.
    """
    flat = [text for example in pieces for pair in example for text in pair]
    if not flat:
        return [0] * len(pieces)
    ids = tok(flat, add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for example in pieces:
        n = 2 * len(example)
        out.append(sum(len(x) for x in ids[k : k + n]))
        k += n
    return out
