"""JSON Lines text -> Megatron-Core indexed datasets (.bin/.idx), tokenized in parallel.

`preprocess_jsonl` reads one JSON object per line, tokenizes the string under each of
`json_keys` with a Hugging Face tokenizer and writes one indexed dataset per key at
`{output_prefix}_{key}_document.bin/.idx` (Megatron-LM's tools/preprocess_data.py naming, so
`--data-path {output_prefix}_text_document` works in both). Each row is one document of one
sequence. Tokenization is the tokenizer's default call, `tokenizer(text)["input_ids"]`
(special tokens included, e.g. Llama's BOS, as Megatron-LM's HuggingFaceTokenizer does);
`append_eod` adds the document-end token (`document_end_id`) after each document.

Lines go to a process pool in chunks (`imap`, ordered), so the output order is the input
order at any `workers`. Token ids are stored as uint16 when the vocabulary fits
(`DType.optimal_dtype`), else int32.

Bad input: a line that is not a JSON object raises `JsonlFormatError` naming the file and
line (with `skip_bad_rows` such lines are counted and the first few locations reported);
a missing key or a non-string value always raises, naming the key, the file, the line and
the keys present. Blank lines and documents with no tokens are skipped and counted. On an
error the partly written outputs are removed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_REPORTED_BAD_ROWS = 5
"""How many bad-row locations the summary lists (all of them are counted)."""

_CHUNK_LINES = 256


class JsonlFormatError(ValueError):
    """A row of the input file is not a JSON object with the expected string keys."""


def indexed_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's name of the indexed dataset for `key`: `{output_prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


def document_end_id(tokenizer) -> int:
    """The token that ends a document: the tokenizer's EOS, as Megatron-LM's `tokenizer.eod`."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos_token, which marks the end of a "
            "document (--append-eod, and the EOD of GPTDataset): set one in its "
            "tokenizer_config.json"
        )
    return tokenizer.eos_token_id


@dataclass
class PreprocessSummary:
    """What `preprocess_jsonl` wrote and skipped."""

    input: str
    outputs: dict[str, str]
    """json key -> indexed dataset prefix."""
    dtype: str
    documents: dict[str, int] = field(default_factory=dict)
    """json key -> documents written."""
    tokens: dict[str, int] = field(default_factory=dict)
    """json key -> tokens written (EOD included)."""
    empty_documents: dict[str, int] = field(default_factory=dict)
    """json key -> rows whose text has no tokens (skipped)."""
    blank_lines: int = 0
    bad_rows: int = 0
    """Lines that are not JSON objects, skipped under skip_bad_rows."""
    bad_row_locations: list[str] = field(default_factory=list)
    """The first MAX_REPORTED_BAD_ROWS of them as `file:line: reason`."""


# Per worker process: the tokenizer and the options, set once by `_init_worker`.
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, json_keys: list[str], append_eod: bool, input_name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    _WORKER.update(
        tokenizer=tokenizer,
        keys=json_keys,
        eod=document_end_id(tokenizer) if append_eod else None,
        input=input_name,
    )


def _encode_chunk(chunk: list[tuple[int, str]]) -> tuple[list[tuple[int, str, object]], int]:
    """[(line number, line)] -> ([(line number, status, payload)] in order, bytes of the chunk).

    status "ok": payload = [token ids per key]; "blank"; "bad": payload = reason (skippable);
    "key": payload = an error message (never skippable).
    """
    keys, tokenizer, eod = _WORKER["keys"], _WORKER["tokenizer"], _WORKER["eod"]
    results: list = []
    texts: list[str] = []
    for line_no, line in chunk:
        if not line.strip():
            results.append((line_no, "blank", None))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            results.append((line_no, "bad", f"malformed JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(row, dict):
            results.append((line_no, "bad", f"a JSON {type(row).__name__}, not an object"))
            continue
        missing = [k for k in keys if k not in row]
        wrong = [k for k in keys if k in row and not isinstance(row[k], str)]
        if missing or wrong:
            what = (
                f"has no key {missing[0]!r}"
                if missing
                else f"key {wrong[0]!r} holds a {type(row[wrong[0]]).__name__}, not a string"
            )
            results.append(
                (
                    line_no,
                    "key",
                    f"{_WORKER['input']}:{line_no}: the row {what} (keys present: "
                    f"{sorted(row)}); choose the text key with --json-keys",
                )
            )
            continue
        results.append((line_no, "ok", len(texts)))
        texts += [row[k] for k in keys]
    if texts:
        ids = tokenizer(texts)["input_ids"]
        if eod is not None:
            ids = [doc + [eod] if doc else doc for doc in ids]
        n = len(keys)
        results = [
            (line_no, status, ids[payload : payload + n] if status == "ok" else payload)
            for line_no, status, payload in results
        ]
    return results, sum(len(line.encode("utf-8")) for _, line in chunk)


def _read_chunks(path: Path) -> Iterator[list[tuple[int, str]]]:
    """Chunks of (1-based line number, line) over the file."""
    chunk = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            chunk.append((line_no, line))
            if len(chunk) == _CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def preprocess_jsonl(
    input_path: str | Path,
    tokenizer_path: str | Path,
    output_prefix: str,
    json_keys: tuple[str, ...] | list[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_rows: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessSummary:
    """Tokenize `input_path` (JSON Lines) into one indexed dataset per key; see the module doc.

    `progress(rows, bytes)` is called after every chunk of lines with the rows tokenized and
    the bytes read.
    """
    import numpy
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )
    from transformers import AutoTokenizer

    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"--input {input_path}: no such file")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    json_keys = list(json_keys)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    dtype = DType.optimal_dtype(len(tokenizer))
    outputs = {key: indexed_prefix(output_prefix, key) for key in json_keys}
    summary = PreprocessSummary(
        str(input_path),
        outputs,
        numpy.dtype(dtype).name,
        documents=dict.fromkeys(json_keys, 0),
        tokens=dict.fromkeys(json_keys, 0),
        empty_documents=dict.fromkeys(json_keys, 0),
    )
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builders = {k: IndexedDatasetBuilder(get_bin_path(p), dtype=dtype) for k, p in outputs.items()}

    init_args = (str(tokenizer_path), json_keys, append_eod, str(input_path))
    # Tokenizer threads inside each worker would oversubscribe the cores the pool already uses.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = None
    if workers > 1:
        pool = get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)
    else:
        _init_worker(*init_args)
    try:
        chunks = _read_chunks(input_path)
        results = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
        for chunk_results, nbytes in results:
            rows = 0
            for line_no, status, payload in chunk_results:
                if status == "ok":
                    rows += 1
                    for key, ids in zip(json_keys, payload, strict=True):
                        if not ids:
                            summary.empty_documents[key] += 1
                            continue
                        builders[key].add_document(ids, [len(ids)])
                        summary.documents[key] += 1
                        summary.tokens[key] += len(ids)
                elif status == "blank":
                    summary.blank_lines += 1
                elif status == "key":
                    raise JsonlFormatError(payload)
                else:
                    location = f"{input_path}:{line_no}: {payload}"
                    if not skip_bad_rows:
                        raise JsonlFormatError(
                            f"{location}; fix the line or pass --skip-bad-rows to skip such lines"
                        )
                    summary.bad_rows += 1
                    if len(summary.bad_row_locations) < MAX_REPORTED_BAD_ROWS:
                        summary.bad_row_locations.append(location)
            if progress is not None:
                progress(rows, nbytes)
    except BaseException:
        for key, prefix in outputs.items():
            builders[key].data_file.close()
            for path in (get_bin_path(prefix), get_idx_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for key, prefix in outputs.items():
        builders[key].finalize(get_idx_path(prefix))
    _log_summary(summary)
    return summary


def _log_summary(summary: PreprocessSummary) -> None:
    for key, prefix in summary.outputs.items():
        logger.info(
            "%s: %d documents, %d tokens (%s) -> %s.bin/.idx; %d empty documents skipped",
            key,
            summary.documents[key],
            summary.tokens[key],
            summary.dtype,
            prefix,
            summary.empty_documents[key],
        )
    if summary.blank_lines:
        logger.info("%d blank lines skipped", summary.blank_lines)
    if summary.bad_rows:
        logger.warning(
            "%d bad rows skipped (--skip-bad-rows); the first: %s",
            summary.bad_rows,
            "; ".join(summary.bad_row_locations),
        )
