"""Per-token-id weights of the objective (`--token-weights FILE`): semantic-aware DFT in general.

The official DFT repository's semantic-aware variant weights target tokens by what they are
(numbers, stop words, the rest). Here that is a table: one weight per vocabulary id, which
multiplies the objective's per-token loss and gradient (not asft's KL term). The file is JSON:

    {
      "default": 1.0,                                  weight of every id not named below
      "classes": {"number": 2.0, "stopword": 0.5},     weight by token class
      "tokens":  {"<|im_end|>": 1.0, "Ġtherefore": 1.5},  by token string (the vocabulary's)
      "ids":     {"151643": 0.0}                       by id
    }

Later entries win: default < classes < tokens < ids. Each id belongs to exactly one class,
decided from its decoded text (stripped of surrounding whitespace), first match wins:
"special" (the tokenizer's special tokens), "whitespace" (nothing left), "number" (digits,
with . , / : - between them), "punctuation" (punctuation and symbols only), "stopword"
(an English stop word, case-insensitive), else "word". Ids past the tokenizer's vocabulary
(padding rows of a converted model) are "special".
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import torch

CLASSES = ("special", "whitespace", "number", "punctuation", "stopword", "word")
_KEYS = ("default", "classes", "tokens", "ids")
_NUMBER = re.compile(r"^[+-]?\d+([.,/:-]\d+)*[.,]?$|^[.,]\d+$")

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves""".split()  # noqa: SIM905 (a word list reads better as text)
)
"""English stop words (the usual NLTK-style list, closed-class words only)."""


class TokenWeightsError(ValueError):
    """A --token-weights file that cannot be used; the message names the file and the entry."""


def token_class(text: str, special: bool) -> str:
    """The class of one token from its decoded text (see the module docstring)."""
    if special:
        return "special"
    t = text.strip()
    if not t:
        return "whitespace"
    if _NUMBER.match(t):
        return "number"
    if all(unicodedata.category(c)[0] in "PS" for c in t):
        return "punctuation"
    if t.lower() in STOP_WORDS:
        return "stopword"
    return "word"


def token_classes(tokenizer, vocab_size: int) -> list[str]:
    """The class of every id in [0, vocab_size) for a Hugging Face tokenizer."""
    special = set(tokenizer.all_special_ids)
    known = len(tokenizer)
    out = []
    for i in range(vocab_size):
        if i >= known:
            out.append("special")
            continue
        out.append(token_class(tokenizer.decode([i]), i in special))
    return out


def _number(path: Path, where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise TokenWeightsError(f"{path}: {where} must be a number >= 0, got {value!r}")
    return float(value)


def load_token_weights(
    path: str | Path, tokenizer, vocab_size: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """The [vocab_size] fp32 weight table of a --token-weights file, and how many ids took
    their weight from where (e.g. {"default": 148000, "class number": 1203, "tokens": 1})."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TokenWeightsError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise TokenWeightsError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(spec, dict):
        raise TokenWeightsError(f"{path}: must hold a JSON object with keys {', '.join(_KEYS)}")
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise TokenWeightsError(
            f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(_KEYS)}"
        )
    owner = ["default"] * vocab_size
    weights = torch.full((vocab_size,), _number(path, "default", spec.get("default", 1.0)))

    classes = spec.get("classes", {})
    bad = sorted(set(classes) - set(CLASSES))
    if bad:
        raise TokenWeightsError(
            f"{path}: unknown token class(es) {', '.join(bad)}; the classes are "
            f"{', '.join(CLASSES)}"
        )
    if classes:
        for i, cls in enumerate(token_classes(tokenizer, vocab_size)):
            if cls in classes:
                weights[i] = _number(path, f"classes.{cls}", classes[cls])
                owner[i] = f"class {cls}"

    vocab = tokenizer.get_vocab()
    for token, value in spec.get("tokens", {}).items():
        if token not in vocab:
            raise TokenWeightsError(
                f"{path}: tokens.{token!r} is not in the tokenizer's vocabulary (use the "
                "vocabulary's own spelling, e.g. 'Ġthe' for ' the' in byte-level BPE)"
            )
        i = vocab[token]
        weights[i] = _number(path, f"tokens.{token!r}", value)
        owner[i] = "tokens"

    for key, value in spec.get("ids", {}).items():
        try:
            i = int(key)
        except ValueError:
            raise TokenWeightsError(f"{path}: ids.{key!r} is not an integer id") from None
        if not 0 <= i < vocab_size:
            raise TokenWeightsError(
                f"{path}: ids.{key} is outside the model's vocabulary [0, {vocab_size})"
            )
        weights[i] = _number(path, f"ids.{key}", value)
        owner[i] = "ids"
    return weights, dict(Counter(owner))
