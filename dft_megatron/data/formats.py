"""One row -> token ids and the tokens that are targets.

A sample is a list of token ids t[0..n) and a target mask m[0..n): m[i] = 1 when token i
is a target, i.e. the model is trained to predict t[i] from t[:i]. m[0] is always 0 (no
token precedes it). The trainer feeds t[:-1] and scores t[1:] where m[1:] is 1.

Row formats (`detect_format` picks one from the first row's keys, or `--data-format`):
- chat: a list of {role, content} messages. The tokenizer's chat template renders the whole
  conversation once; the conversation is tokenized once (the exact tokens the model sees
  at inference) and a token is a target if it overlaps an assistant turn's text, which
  includes the end-of-turn token the template closes the turn with. The assistant spans
  come from the template's `{% generation %}` markers when it has them; otherwise each
  assistant turn k is the text between rendering messages[:k] with the generation prompt
  and rendering messages[:k + 1] (whitespace after the end-of-turn token is not a target).
  Every assistant turn of a multi-turn chat is a target.
- prompt_response: rendered as [system?, user: prompt, assistant: response] through the
  chat template; a tokenizer without one gets prompt + response + EOS, response and EOS
  being the targets.
- tokenized: `input_ids` and an optional `loss_mask` of the same length, used as given
  (no template, nothing appended; without `loss_mask` every token after the first).
- text: the text's tokens (with the tokenizer's BOS if it adds one) and EOS; every token
  after the first is a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dft_megatron.data.sources import DataError

# Row outcomes, counted and reported by the dataset builder.
OK, TRUNCATED, DROPPED_LONG, NO_TARGET, EMPTY_RESPONSE = range(5)
STATUS_NAMES = ("ok", "truncated", "dropped_too_long", "dropped_no_target", "dropped_empty")

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RowFormat:
    """How rows are read (from DataConfig)."""

    kind: str
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    response_key: str = "response"
    text_key: str = "text"
    system_prompt: str | None = None
    sample_weight_key: str | None = None


def detect_format(row: dict, cfg) -> str:
    """The format of `row` from its keys (cfg: DataConfig); raises DataError if none fits."""
    if cfg.data_format != "auto":
        return cfg.data_format
    keys = set(row)
    if cfg.messages_key in keys:
        return "chat"
    if "input_ids" in keys:
        return "tokenized"
    if cfg.prompt_key in keys and cfg.response_key in keys:
        return "prompt_response"
    if cfg.text_key in keys:
        return "text"
    raise DataError(
        f"cannot tell the row format from the keys {sorted(keys)}: expected "
        f"'{cfg.messages_key}' (chat), 'input_ids' (pre-tokenized), '{cfg.prompt_key}' and "
        f"'{cfg.response_key}' (prompt/response; set --prompt-key/--response-key, e.g. "
        f"problem/solution) or '{cfg.text_key}' (text); or give --data-format"
    )


def _get(row: dict, key: str, where: str):
    if key not in row:
        raise DataError(
            f"{where}: no key '{key}' in the row (keys: {sorted(row)}); set the matching "
            "--*-key flag or fix the data"
        )
    return row[key]


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template


class RowEncoder:
    """Encodes rows of one format with one tokenizer; picklable for worker processes."""

    def __init__(self, fmt: RowFormat, tokenizer, vocab_size: int | None = None):
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if fmt.kind in ("chat", "prompt_response", "text") and tokenizer is None:
            raise DataError(
                f"{fmt.kind} rows need a tokenizer: give --tokenizer-model HF_TOKENIZER_DIR "
                "(or --load a checkpoint that stores one)"
            )
        if fmt.kind == "chat" and not template:
            raise DataError(
                "chat rows need a chat template and the tokenizer has none; give "
                "--chat-template FILE (a Jinja template, e.g. one from a model's "
                "tokenizer_config.json)"
            )
        self.use_template = bool(template)
        self.markers = has_generation_markers(template)

    # -------------------------------------------------------------- per format

    def encode(self, row: dict, where: str) -> tuple[list[int], list[int], int]:
        """-> (token ids, target mask, status: OK, NO_TARGET or EMPTY_RESPONSE)."""
        kind = self.fmt.kind
        if kind == "tokenized":
            return self._tokenized(row, where)
        if kind == "text":
            text = _get(row, self.fmt.text_key, where)
            if not isinstance(text, str):
                raise DataError(f"{where}: '{self.fmt.text_key}' is not a string")
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            eos = self.tokenizer.eos_token_id
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            if not text.strip():
                return ids, [0] * len(ids), EMPTY_RESPONSE
            return ids, [0] + [1] * (len(ids) - 1), OK
        if kind == "prompt_response":
            prompt = _get(row, self.fmt.prompt_key, where)
            response = _get(row, self.fmt.response_key, where)
            for key, value in ((self.fmt.prompt_key, prompt), (self.fmt.response_key, response)):
                if not isinstance(value, str):
                    raise DataError(f"{where}: '{key}' is a {type(value).__name__}, not a string")
            if not response.strip():
                return [], [], EMPTY_RESPONSE
            if not self.use_template:
                return self._plain(prompt, response)
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            if self.fmt.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.fmt.system_prompt})
            return self._chat(messages, where)
        messages = _get(row, self.fmt.messages_key, where)
        self._check_messages(messages, where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return [], [], EMPTY_RESPONSE
        return self._chat(messages, where)

    def weight(self, row: dict, where: str) -> float:
        key = self.fmt.sample_weight_key
        if key is None:
            return 1.0
        value = _get(row, key, where)
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: '{key}' = {value!r} is not a number") from None
        if not math.isfinite(w):
            raise DataError(f"{where}: '{key}' = {value!r} is not finite")
        return w

    def _tokenized(self, row, where):
        ids = _get(row, "input_ids", where)
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise DataError(f"{where}: 'input_ids' must be a list of integers")
        if self.vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise DataError(
                    f"{where}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
        if "loss_mask" in row and row["loss_mask"] is not None:
            mask = row["loss_mask"]
            if not isinstance(mask, list) or len(mask) != len(ids):
                raise DataError(
                    f"{where}: 'loss_mask' must be a list as long as 'input_ids' "
                    f"({len(ids)}), got {len(mask) if isinstance(mask, list) else type(mask)}"
                )
            if any(v not in (0, 1) for v in mask):
                raise DataError(f"{where}: 'loss_mask' values must be 0 or 1")
            mask = [0] + [int(v) for v in mask[1:]]
        else:
            mask = [0] + [1] * (len(ids) - 1)
        return list(ids), mask, OK if any(mask) else NO_TARGET

    def _plain(self, prompt: str, response: str):
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            r = r + [tok.eos_token_id]
        return p + r, [0] * len(p) + [1] * len(r), OK

    @staticmethod
    def _check_messages(messages, where):
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {i} needs 'role' and 'content' (got {m!r})")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {i} has role {m['role']!r}; roles are {ROLES}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i} content must be a string")

    # -------------------------------------------------------------- chat templates

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _chat(self, messages, where):
        tok = self.tokenizer
        if self.markers:
            out = tok.apply_chat_template(
                messages,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids = list(out["input_ids"])
            mask = [int(v) for v in out["assistant_masks"]]
        else:
            text = self._render(messages)
            spans = []
            last = len(messages) - 1
            for k, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = self._render(messages[:k], add_generation_prompt=True)
                upto = text if k == last else self._render(messages[: k + 1])
                if not (upto.startswith(before) and text.startswith(upto)):
                    raise DataError(
                        f"{where}: the chat template renders earlier turns differently once "
                        "later turns are added, so assistant turns cannot be located; use a "
                        "template with {% generation %} markers (--chat-template FILE)"
                    )
                spans.append((len(before), len(upto.rstrip())))
            # The Rust tokenizer directly: the same ids as tokenizer(text), with offsets.
            enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
            ids = enc.ids
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            hit = np.zeros(len(ids), dtype=bool)
            for s0, e1 in spans:  # a token overlapping an assistant span is a target
                hit |= (offsets[:, 0] < e1) & (offsets[:, 1] > s0)
            mask = hit.astype(np.int8).tolist()
        if mask:
            mask[0] = 0
        return ids, mask, OK if any(mask) else NO_TARGET


def fit(ids: list[int], mask: list[int], seq_length: int, truncation: str):
    """Cut or drop a sample longer than seq_length + 1 tokens -> (ids, mask, status)."""
    if len(ids) - 1 <= seq_length:
        return ids, mask, OK
    if truncation == "drop":
        return [], [], DROPPED_LONG
    ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
    return ids, mask, TRUNCATED if any(mask) else NO_TARGET
