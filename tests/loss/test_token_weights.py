"""The --token-weights table: token classes, the precedence of its entries, its errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from dft_megatron.loss.token_weights import (
    TokenWeightsError,
    load_token_weights,
    token_class,
    token_classes,
)
from tests.convert.hf_models import save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("12", "number"), (" 3.5", "number"), ("1,000", "number"), ("-7", "number"),
        ("3/4", "number"), (".5", "number"), ("   ", "whitespace"), ("\n", "whitespace"),
        (".", "punctuation"), ("$", "punctuation"), ("\\(", "punctuation"), (" The", "stopword"),
        ("of", "stopword"), ("answer", "word"), ("x2", "word"), ("12a", "word"),
    ],
)  # fmt: skip
def test_token_class(text, cls):
    assert token_class(text, special=False) == cls
    assert token_class(text, special=True) == "special"


def test_table_precedence_and_counts(tokenizer, tmp_path):
    vocab = len(tokenizer) + 3  # padding rows past the tokenizer: "special"
    seven = tokenizer.convert_ids_to_tokens(7)
    spec = {
        "default": 0.5,
        "classes": {"number": 2.0, "special": 0.0},
        "tokens": {seven: 4.0},
        "ids": {"8": 5.0, str(tokenizer.convert_tokens_to_ids("1")): 6.0},
    }
    path = tmp_path / "w.json"
    path.write_text(json.dumps(spec))
    weights, counts = load_token_weights(path, tokenizer, vocab)
    classes = token_classes(tokenizer, vocab)
    assert weights.shape == (vocab,)
    assert weights[7] == 4.0 and weights[8] == 5.0
    assert weights[tokenizer.convert_tokens_to_ids("1")] == 6.0  # an id beats its class
    assert weights[tokenizer.convert_tokens_to_ids("2")] == 2.0
    assert all(weights[i] == 0.0 for i in range(len(tokenizer), vocab))
    assert weights[tokenizer.convert_tokens_to_ids("a")] == 0.5
    assert counts["tokens"] == 1 and counts["ids"] == 2
    assert sum(counts.values()) == vocab
    assert counts["class number"] == sum(c == "number" for c in classes) - 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"classes": {"digits": 2.0}}, "unknown token class"),
        ({"weights": {}}, "unknown key"),
        ({"ids": {"100000": 1.0}}, "outside the model's vocabulary"),
        ({"ids": {"x": 1.0}}, "not an integer id"),
        ({"tokens": {"no-such-token": 1.0}}, "not in the tokenizer's vocabulary"),
        ({"default": -1}, "default must be a number >= 0"),
        ({"classes": {"number": "high"}}, "classes.number must be a number"),
    ],
)
def test_bad_tables_are_named(tokenizer, tmp_path, spec, match):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenWeightsError, match=match) as e:
        load_token_weights(path, tokenizer, len(tokenizer))
    assert str(path) in str(e.value)


def test_bad_json_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{\n  "default": 1.0,\n  oops\n}')
    with pytest.raises(TokenWeightsError, match=rf"{path}:3: not JSON"):
        load_token_weights(path, tokenizer, len(tokenizer))
