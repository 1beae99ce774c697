"""A small byte-level BPE tokenizer (the library's trainer) with ChatML chat templates written
out here, with and without generation markers, trained on the spot."""

from __future__ import annotations

import pytest

CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The same conversation format with TRL-style generation markers around assistant content.
CHATML_MARKED = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    # (a newline right after a block tag is trimmed by transformers' Jinja settings)
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is 2 + 3? 2 + 3 = 5. The answer is \\boxed{5}.",
    "Solve 4x + 2 = 10. Subtract 2: 4x = 8. Divide by 4: x = 2. \\boxed{2}",
    "system user assistant You are helpful. Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog 0123456789 \\frac{1}{2}",
] * 20


def make_tokenizer(path, template=CHATML):
    """The library's byte-level BPE trainer on CORPUS, with `template` as the chat template."""
    from dft_megatron.data.tokenizer import save_chat_tokenizer, train_chat_tokenizer

    tok = train_chat_tokenizer(CORPUS, vocab_size=300)
    tok.chat_template = template
    save_chat_tokenizer(tok, path)
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from dft_megatron.data import load_tokenizer

    return load_tokenizer(tokenizer_dir)
