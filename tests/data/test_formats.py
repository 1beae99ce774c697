"""Row -> token ids and target mask, for every row format, checked token by token.

Reference for chat rows: the rendered template itself. The target tokens must decode to
exactly each assistant turn's content followed by the end-of-turn token, the other tokens to
everything else, and the token ids must be the tokenization of the whole rendered text.
Two independent ways of finding the assistant spans (the template's {% generation %}
markers, and the prefix renderings) must give the same mask.
"""

from __future__ import annotations

import pytest

from dft_megatron.data import DataConfig
from dft_megatron.data.formats import (
    DROPPED_LONG,
    EMPTY_RESPONSE,
    NO_TARGET,
    OK,
    TRUNCATED,
    RowEncoder,
    RowFormat,
    detect_format,
    fit,
)
from dft_megatron.data.sources import DataError
from tests.data.conftest import CHATML_MARKED

SINGLE = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is \\boxed{5}."},
]
MULTI = [
    {"role": "system", "content": "You are a math tutor."},
    {"role": "user", "content": "Solve 4x + 2 = 10."},
    {"role": "assistant", "content": "Subtract 2: 4x = 8. Divide by 4: x = 2."},
    {"role": "user", "content": "And 2x = 6?"},
    {"role": "assistant", "content": "Divide by 2: x = 3. \\boxed{3}"},
]


def _split(tokenizer, ids, mask):
    """Decoded target tokens and decoded other tokens, each joined."""
    target = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    other = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    return target, other


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_chat_mask_matches_template(tokenizer, messages):
    enc = RowEncoder(RowFormat("chat"), tokenizer)
    ids, mask, status = enc.encode({"messages": messages}, "row")
    assert status == OK
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    target, other = _split(tokenizer, ids, mask)
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert target == "".join(answers)
    # Everything else is prompt: the text with the assistant turns cut out.
    rest = text
    for a in answers:
        rest = rest.replace(a, "", 1)
    assert other == rest
    # Token by token: a target token lies inside an assistant answer.
    pos = 0
    for t, m in zip(ids, mask, strict=True):
        piece = tokenizer.decode([t])
        found = text.index(piece, pos)
        inside = any(
            text.find(a) <= found < text.find(a) + len(a) for a in answers if text.find(a) >= 0
        )
        assert bool(m) == inside, (piece, m)
        pos = found + len(piece)


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_generation_markers_give_the_same_mask(tokenizer, messages):
    plain = RowEncoder(RowFormat("chat"), tokenizer).encode({"messages": messages}, "r")
    marked_tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    marked_tok.chat_template = CHATML_MARKED
    marked = RowEncoder(RowFormat("chat"), marked_tok)
    assert marked.markers and not RowEncoder(RowFormat("chat"), tokenizer).markers
    assert marked.encode({"messages": messages}, "r") == plain


def test_prompt_response_with_system_prompt(tokenizer):
    fmt = RowFormat(
        "prompt_response", prompt_key="problem", response_key="solution", system_prompt="Be brief."
    )
    row = {"problem": "What is 1 + 1?", "solution": "1 + 1 = 2. \\boxed{2}"}
    ids, mask, status = RowEncoder(fmt, tokenizer).encode(row, "r")
    assert status == OK
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": row["problem"]},
        {"role": "assistant", "content": row["solution"]},
    ]
    ref = RowEncoder(RowFormat("chat"), tokenizer).encode({"messages": chat}, "r")
    assert (ids, mask) == ref[:2]
    assert _split(tokenizer, ids, mask)[0] == row["solution"] + "<|im_end|>"


def test_prompt_response_without_template(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    enc = RowEncoder(RowFormat("prompt_response"), tok)
    ids, mask, _ = enc.encode({"prompt": "Q: 2 + 2?\n", "response": "4"}, "r")
    assert ids[-1] == tok.eos_token_id
    assert _split(tok, ids, mask) == ("4<|im_end|>", "Q: 2 + 2?\n")


def test_tokenized_rows_used_as_given():
    enc = RowEncoder(RowFormat("tokenized"), None, vocab_size=50)
    ids, mask, status = enc.encode({"input_ids": [5, 6, 7, 8], "loss_mask": [1, 0, 1, 1]}, "r")
    assert (ids, mask, status) == ([5, 6, 7, 8], [0, 0, 1, 1], OK)  # token 0 has no context
    assert enc.encode({"input_ids": [5, 6, 7]}, "r")[1] == [0, 1, 1]
    assert enc.encode({"input_ids": [5, 6], "loss_mask": [1, 0]}, "r")[2] == NO_TARGET
    with pytest.raises(DataError, match="r: 'loss_mask' must be a list as long as"):
        enc.encode({"input_ids": [5, 6], "loss_mask": [1]}, "r")
    with pytest.raises(DataError, match=r"token id 60 is outside the vocabulary \[0, 50\)"):
        enc.encode({"input_ids": [5, 60]}, "r")


def test_text_rows_every_token_a_target(tokenizer):
    ids, mask, status = RowEncoder(RowFormat("text"), tokenizer).encode({"text": "x = 2"}, "r")
    assert status == OK and ids[-1] == tokenizer.eos_token_id
    assert mask == [0] + [1] * (len(ids) - 1)


def test_empty_response_and_no_assistant_turn(tokenizer):
    enc = RowEncoder(RowFormat("prompt_response"), tokenizer)
    assert enc.encode({"prompt": "Q", "response": "  "}, "r")[2] == EMPTY_RESPONSE
    chat = RowEncoder(RowFormat("chat"), tokenizer)
    assert chat.encode({"messages": [{"role": "user", "content": "hi"}]}, "r")[2] == EMPTY_RESPONSE


def test_fit_truncates_or_drops():
    ids, mask = list(range(10)), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert fit(ids, mask, 9, "right") == (ids, mask, OK)  # 10 tokens fill 9 positions
    assert fit(ids, mask, 7, "right") == (ids[:8], mask[:8], TRUNCATED)
    assert fit(ids, mask, 4, "right")[2] == NO_TARGET  # the cut left no target
    assert fit(ids, mask, 7, "drop") == ([], [], DROPPED_LONG)


def test_detect_format_and_errors(tokenizer):
    cfg = DataConfig(prompt_key="problem", response_key="solution")
    assert detect_format({"messages": []}, cfg) == "chat"
    assert detect_format({"input_ids": []}, cfg) == "tokenized"
    assert detect_format({"problem": "", "solution": ""}, cfg) == "prompt_response"
    assert detect_format({"text": ""}, cfg) == "text"
    with pytest.raises(DataError, match=r"keys \['question'\].*--prompt-key"):
        detect_format({"question": "q"}, cfg)
    enc = RowEncoder(RowFormat("prompt_response", prompt_key="problem"), tokenizer)
    with pytest.raises(DataError, match=r"f.jsonl:3: no key 'problem' in the row \(keys: \['q'"):
        enc.encode({"q": "x", "response": "y"}, "f.jsonl:3")
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(DataError, match="--chat-template FILE"):
        RowEncoder(RowFormat("chat"), tok)
    with pytest.raises(DataError, match="need a tokenizer: give --tokenizer-model"):
        RowEncoder(RowFormat("text"), None)
    with pytest.raises(DataError, match="message 0 has role 'robot'"):
        RowEncoder(RowFormat("chat"), tokenizer).encode(
            {"messages": [{"role": "robot", "content": "x"}]}, "r"
        )
