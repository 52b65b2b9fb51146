"""Prompt rendering and response-only labels, with the fallback template and a ChatML template."""

from __future__ import annotations

import pytest

from loraflow.ml.examples import encode_all
from loraflow.ml.models import load_tokenizer
from loraflow.ml.prompts import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    encode,
    last_user_turn,
    prompt_text,
    reference,
    to_messages,
)

# SmolLM2-135M-Instruct's chat template, as stored in the GGUF file that the demo uses.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

ALPACA = {"instruction": "Say hello to Ann.", "input": "", "output": "Hello, Ann! Nice to meet you."}
CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "Say hello to Bob."},
        {"role": "assistant", "content": "Hello, Bob!"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ]
}


def make_tok(model_dir, kind: str):
    """The tiny tokenizer as saved (no chat template), or given SmolLM2's ChatML template."""
    t = load_tokenizer(model_dir)
    assert not t.chat_template  # so prompts.py falls back to FALLBACK_TEMPLATE
    if kind == "chatml":
        t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        t.eos_token = "<|im_end|>"
        t.chat_template = SMOLLM2_TEMPLATE
    return t


@pytest.fixture(params=["fallback", "chatml"])
def tok(request, tiny_model_dir):
    return make_tok(tiny_model_dir, request.param)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def labelled_spans(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of labelled token ids."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for x in labels:
        if x != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(x)
        previous = x
    return spans


def end_of_turn(tok) -> str:
    """What the template writes after an assistant message: the end-of-turn token and a newline."""
    return tok.eos_token + "\n"


# --- rendering ---


def test_fallback_template_renders_exactly(tiny_model_dir) -> None:
    t = load_tokenizer(tiny_model_dir)
    assert prompt_text(t, ALPACA) == "### User:\nSay hello to Ann.\n### Response:\n"
    full = t.apply_chat_template(to_messages(ALPACA), tokenize=False, chat_template=FALLBACK_TEMPLATE)
    assert full == "### User:\nSay hello to Ann.\n### Response:\nHello, Ann! Nice to meet you.</s>\n"


def test_chatml_template_renders_exactly(tiny_model_dir) -> None:
    tok = make_tok(tiny_model_dir, "chatml")
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    expected = SMOLLM2_SYSTEM + "<|im_start|>user\nSay hello to Ann.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(tok, ALPACA) == expected


def test_input_field_is_appended_to_the_instruction(tok) -> None:
    record = {"instruction": "  Define the noun.  ", "input": " pace lap ", "output": "A first lap."}
    assert to_messages(record) == [
        {"role": "user", "content": "Define the noun.\n\npace lap"},
        {"role": "assistant", "content": "A first lap."},
    ]
    assert "Define the noun.\n\npace lap" in prompt_text(tok, record)
    assert last_user_turn(record) == "Define the noun.\n\npace lap"
    for empty in ("", "   ", None):
        assert to_messages({**record, "input": empty})[0]["content"] == "Define the noun."
    assert to_messages({"instruction": "Define it.", "output": "x"})[0]["content"] == "Define it."


def test_reference_and_last_user_turn_of_chat_records() -> None:
    assert reference(CHAT) == "Four."
    assert last_user_turn(CHAT) == "What is two plus two?"
    assert reference(ALPACA) == "Hello, Ann! Nice to meet you."


# --- labels ---


def test_labels_mask_exactly_the_prompt(tok) -> None:
    enc = encode(tok, ALPACA, max_length=512)
    prompt_ids = tok(prompt_text(tok, ALPACA), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert len(enc.input_ids) == len(enc.labels) > n
    assert enc.input_ids[:n] == prompt_ids
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    assert enc.labels[n:] == enc.input_ids[n:]
    assert enc.label_tokens == len(enc.input_ids) - n
    assert decode(tok, enc.labels[n:]) == ALPACA["output"] + end_of_turn(tok)
    # The whole sequence is the rendered conversation, token for token.
    assert decode(tok, enc.input_ids) == prompt_text(tok, ALPACA) + ALPACA["output"] + end_of_turn(tok)
    assert tok.convert_tokens_to_ids(tok.eos_token) in enc.labels


def test_multi_turn_chat_labels_only_assistant_turns(tok) -> None:
    enc = encode(tok, CHAT, max_length=512)
    spans = labelled_spans(enc.labels)
    assert [decode(tok, s) for s in spans] == ["Hello, Bob!" + end_of_turn(tok), "Four." + end_of_turn(tok)]
    unlabelled = decode(tok, [i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab == IGNORE_INDEX])
    for m in CHAT["messages"]:
        assert (m["content"] in unlabelled) == (m["role"] != "assistant")
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(enc.input_ids, enc.labels, strict=True))


def test_truncation_keeps_the_start(tok) -> None:
    full = encode(tok, CHAT, max_length=512)
    cut = encode(tok, CHAT, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3]
    assert cut.labels == full.labels[:-3]
    assert 0 < cut.label_tokens < full.label_tokens


def test_example_with_response_cut_entirely_has_no_labels(tok) -> None:
    n_prompt = len(tok(prompt_text(tok, ALPACA), add_special_tokens=False)["input_ids"])
    enc = encode(tok, ALPACA, max_length=n_prompt)
    assert len(enc.input_ids) == n_prompt
    assert enc.label_tokens == 0
    one = encode(tok, ALPACA, max_length=n_prompt + 1)
    assert one.label_tokens == 1
    # The training data path drops the unlabelled example and keeps the other.
    kept = encode_all(tok, [ALPACA, {**ALPACA, "instruction": "Hi."}], max_length=n_prompt)
    assert len(kept) == 1 and kept[0].label_tokens > 0


def test_template_that_is_not_prefix_consistent_is_refused(tiny_model_dir) -> None:
    t = load_tokenizer(tiny_model_dir)
    # The generation prompt says "Answer", the rendered assistant turn "Response": no token boundary exists.
    t.chat_template = FALLBACK_TEMPLATE.replace(
        "{% if add_generation_prompt %}### Response:", "{% if add_generation_prompt %}### Answer:"
    )
    with pytest.raises(ValueError, match="not prefix-consistent"):
        encode(t, ALPACA, max_length=512)
