"""The quickstart tokenizer: lossless round trip, special tokens, the ChatML template, the CLI.

References: the input strings themselves (round trip), and Qwen2.5's ChatML layout written
out by hand (template rendering).
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from dft_megatron.data.math_problems import generate_splits
from dft_megatron.data.tokenizer import (
    DEFAULT_SYSTEM_MESSAGE,
    save_chat_tokenizer,
    train_chat_tokenizer,
)

TEXTS = [
    "Compute $\\frac{7}{4} - \\frac{5}{2}$.\nThe answer is \\boxed{-\\frac{3}{4}}.",
    "  leading spaces, 1234567890 digits,\ttabs\n\nand blank lines  ",
    "Ünïcode: 中文, emoji 🙂, x^2 + y_1 \\geq 0",
    "The answer is \\boxed{1711}.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    train, _ = generate_splits(train_size=200, test_size=0, seed=1)
    texts = [f"{r['problem']}\n{r['solution']}" for r in train]
    tokenizer = train_chat_tokenizer(texts, vocab_size=400)
    return save_chat_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_round_trip_is_lossless(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Digits are split one by one, as in Qwen2.5.
    assert tokenizer.tokenize("12345") == list("12345")


def test_special_tokens(tokenizer):
    assert len(tokenizer) <= 400
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    ids = [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    ]
    assert ids == [0, 1, 2]
    encoded = tokenizer("a<|im_start|>b<|im_end|>", add_special_tokens=False)["input_ids"]
    assert encoded[1] == 1 and encoded[3] == 2
    # No BOS or EOS is added to plain text.
    assert tokenizer("7")["input_ids"] == tokenizer.convert_tokens_to_ids(["7"])


def test_chat_template_renders_chatml(tokenizer):
    chat = [
        {"role": "user", "content": "What is $2 + 3$?"},
        {"role": "assistant", "content": "The answer is \\boxed{5}."},
        {"role": "user", "content": "And $2 \\times 3$?"},
        {"role": "assistant", "content": "The answer is \\boxed{6}."},
    ]
    default_system = f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
    assert tokenizer.apply_chat_template(chat, tokenize=False) == default_system + turns

    system = [{"role": "system", "content": "Reason step by step."}]
    rendered = tokenizer.apply_chat_template(
        system + chat[:1], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nReason step by step.<|im_end|>\n"
        "<|im_start|>user\nWhat is $2 + 3$?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert tokenizer.decode(ids) == default_system + turns
    assert "{% generation %}" not in tokenizer.chat_template.replace(
        "{%- generation", "{% generation"
    )


def test_saved_for_transformers_4(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_training_is_deterministic(tokenizer_dir):
    train, _ = generate_splits(train_size=200, test_size=0, seed=1)
    texts = [f"{r['problem']}\n{r['solution']}" for r in train]
    again = train_chat_tokenizer(texts, vocab_size=400)
    saved = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert json.loads(again.backend_tokenizer.to_str()) == saved


def test_vocab_below_the_byte_alphabet_is_refused():
    with pytest.raises(ValueError, match="256 byte symbols"):
        train_chat_tokenizer(["abc"], vocab_size=100)


def test_make_math_data_cli(tmp_path):
    from tools.make_math_data import main

    out = tmp_path / "math"
    summary = main(
        ["--output-dir", str(out), "--train-size", "60", "--test-size", "12", "--seed", "5",
         "--vocab-size", "320"]
    )  # fmt: skip
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 60 and len(test) == 12
    assert {"problem", "solution", "answer"} <= set(test[0])
    assert summary["train"]["rows"] == 60 and summary["tokenizer"]["vocab_size"] <= 320
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.decode(tokenizer(train[0]["solution"])["input_ids"]) == train[0]["solution"]

    bare = tmp_path / "bare"
    main(["--output-dir", str(bare), "--train-size", "8", "--test-size", "4", "--no-tokenizer"])
    assert sorted(p.name for p in bare.iterdir()) == ["test.jsonl", "train.jsonl"]


def test_bundled_example_data_is_what_the_documented_command_writes(tmp_path):
    """examples/data/README.md's command reproduces examples/data/math byte for byte."""
    from pathlib import Path

    from tools.make_math_data import main

    bundled = Path(__file__).resolve().parents[2] / "examples" / "data" / "math"
    main(["--output-dir", str(tmp_path), "--train-size", "2000", "--test-size", "200",
          "--seed", "1234", "--vocab-size", "1024"])  # fmt: skip
    for name in ("train.jsonl", "test.jsonl", "tokenizer/tokenizer.json",
                 "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja"):  # fmt: skip
        assert (tmp_path / name).read_bytes() == (bundled / name).read_bytes(), name
