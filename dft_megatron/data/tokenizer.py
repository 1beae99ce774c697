"""A small byte-level BPE tokenizer with a ChatML chat template, for the quickstart.

`train_chat_tokenizer(texts, vocab_size)` trains one with Hugging Face `tokenizers` in the
layout of Qwen2.5's: the same pre-tokenizer regex (digits split one by one, which keeps
arithmetic learnable), byte-level fallback so every string round-trips exactly, and the
specials `<|endoftext|>` (padding and document end), `<|im_start|>` and `<|im_end|>` (end of
a chat turn and the EOS of chat generation). `save_chat_tokenizer` writes it as a
`transformers` tokenizer folder that `AutoTokenizer.from_pretrained` loads.

The chat template is Qwen2.5's without tools: `<|im_start|>role\\ncontent<|im_end|>\\n` per
turn, a default system turn when the conversation has none, and `add_generation_prompt`
opening an assistant turn. It has no `{% generation %}` markers: the SFT masking finds the
assistant spans itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."

# Qwen2's pre-tokenization split (tokenizer.json of Qwen2.5): contractions, letter runs with
# one leading non-letter, single digits, punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A `PreTrainedTokenizerFast` trained on `texts` with `vocab_size` entries (specials included).

    Deterministic for the same texts in the same order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"--vocab-size {vocab_size} is below the {len(alphabet)} byte symbols plus "
            f"{len(SPECIAL_TOKENS)} special tokens that a byte-level tokenizer needs"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def save_chat_tokenizer(tokenizer, path: str | Path) -> Path:
    """Write `tokenizer` as a folder that `AutoTokenizer.from_pretrained(path)` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    # transformers 5 records its own class name ("TokenizersBackend"), which transformers 4
    # cannot resolve; 5 loads the name 4 knows as its fast-tokenizer alias.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
