"""SFT datasets: files -> tokenized, prompt-masked samples -> packed (or padded) sequences.

Preparation (`prepare_sft_rows`) reads the rows (`sources`), encodes each one
(`formats.RowEncoder`, in `num_workers` processes through `datasets.map`), fits it to the
sequence length (`--truncation`) and keeps the samples with at least one target token.
Every row's outcome is counted (`SFTDataStats`), and the result is cached on disk under
`--data-cache-path`, keyed by the files (path, size, modification time), the tokenizer and
the options, so a second run (or the other ranks of this one) memory-maps it instead of
tokenizing again.

`SFTDataset` then groups samples into sequences of `seq_length` positions: several per
sequence with packing (`packing.pack`, best-fit decreasing over a seeded shuffle of the
samples), one per sequence without. Item i is the i-th sequence, built on access:
{"tokens", "labels", "loss_mask", "loss_weight", "position_ids", "segment_ids"}, [s] each.
Its order is fixed by the seed; `EpochShuffled` orders the sequences per epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dft_megatron.data import formats
from dft_megatron.data.config import DataConfig, split_paths
from dft_megatron.data.packing import assemble, pack
from dft_megatron.data.sources import SOURCE, DataError, decode_row, load_rows

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_MAX_REPORTED = 5


@dataclass
class SFTDataStats:
    """What preparation did with the rows, and how well they pack."""

    rows: int = 0
    bad_rows: int = 0
    bad_row_locations: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    """Rows per outcome: ok, truncated, dropped_too_long, dropped_no_target, dropped_empty."""
    outcome_locations: dict[str, list[str]] = field(default_factory=dict)
    """The first few rows (file:line) of every outcome but ok."""
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    sequences: int = 0
    seq_length: int = 0
    packing_efficiency: float = 0.0
    """Fraction of the sequences' positions that hold a sample token (not padding)."""

    def lines(self) -> list[str]:
        out = [
            f"rows {self.rows}: "
            + ", ".join(f"{k} {v}" for k, v in self.outcomes.items())
            + (f", malformed (skipped) {self.bad_rows}" if self.bad_rows else ""),
            f"samples {self.samples}, tokens {self.tokens}, target tokens {self.target_tokens} "
            f"({self.target_tokens / max(self.tokens, 1):.1%})",
        ]
        if self.sequences:
            out.append(
                f"sequences {self.sequences} x {self.seq_length} positions, packing "
                f"efficiency {self.packing_efficiency:.1%} (non-padding positions)"
            )
        for name, where in self.outcome_locations.items():
            if where:
                out.append(f"{name}: first at {'; '.join(where)}")
        if self.bad_row_locations:
            out.append(f"malformed rows: first at {'; '.join(self.bad_row_locations)}")
        return out


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None):
    """A Hugging Face tokenizer folder (and optionally a Jinja chat template file)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"--tokenizer-model {path}: not a folder (give a Hugging Face tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise DataError(
            f"--tokenizer-model {path}: cannot load a tokenizer from it ({e})"
        ) from None
    if chat_template is not None:
        try:
            tok.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"--chat-template {chat_template}: {e.strerror}") from None
    if not tok.is_fast:
        raise DataError(
            f"--tokenizer-model {path}: a slow (Python) tokenizer; the data pipeline needs a "
            "fast one (tokenizer.json) for token offsets"
        )
    return tok


def _tokenizer_fingerprint(tokenizer) -> str:
    if tokenizer is None:
        return "none"
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(paths, cfg: DataConfig, tokenizer, seq_length, vocab_size) -> str:
    h = hashlib.sha256()
    for p in paths:
        path = Path(p).resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    options = {
        k: getattr(cfg, k)
        for k in (
            "data_format",
            "messages_key",
            "prompt_key",
            "response_key",
            "system_prompt",
            "text_key",
            "sample_weight_key",
            "truncation",
            "skip_bad_rows",
        )
    }
    h.update(json.dumps([options, seq_length, vocab_size, CACHE_VERSION]).encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:20]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.data_cache_dir:
        return Path(cfg.data_cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dft_megatron" / "data"


def _encode_batch(batch, encoder, seq_length, truncation):
    out = {
        "input_ids": [],
        "target_mask": [],
        "weight": [],
        "targets": [],
        "status": [],
        SOURCE: [],
    }
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    for stored in rows:
        where = stored[SOURCE]
        row = decode_row(stored)
        ids, mask, status = encoder.encode(row, where)
        if status == formats.OK:
            ids, mask, status = formats.fit(ids, mask, seq_length, truncation)
        keep = status in (formats.OK, formats.TRUNCATED)
        out["input_ids"].append(ids if keep else [])
        out["target_mask"].append(mask if keep else [])
        out["weight"].append(encoder.weight(row, where) if keep else 0.0)
        out["targets"].append(sum(mask) if keep else 0)
        out["status"].append(status)
        out[SOURCE].append(where)
    return out


def prepare_sft_rows(
    paths: list[str],
    cfg: DataConfig,
    tokenizer,
    seq_length: int,
    vocab_size: int | None = None,
):
    """Files -> (datasets.Dataset of kept samples {input_ids, target_mask, weight, source},
    SFTDataStats without the packing numbers). Cached on disk; see the module docstring."""
    import datasets

    for p in paths:
        if not Path(p).exists():
            raise DataError(f"{p}: no such file or folder (--sft-data / --valid-data)")
    key = _cache_key(paths, cfg, tokenizer, seq_length, vocab_size)
    root = cache_root(cfg)
    done = root / f"sft-{key}"
    if (done / "stats.json").exists():
        stats = SFTDataStats(**json.loads((done / "stats.json").read_text()))
        logger.info("tokenized data from the cache %s", done)
        return datasets.load_from_disk(str(done / "samples")), stats

    work = root / f"sft-{key}.incomplete-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        rows, bad = load_rows(paths, work / "rows", cfg.skip_bad_rows)
        if len(rows) == 0:
            raise DataError(f"{', '.join(paths)}: no rows")
        kind = formats.detect_format(decode_row(rows[0]), cfg)
        fmt = formats.RowFormat(
            kind=kind,
            messages_key=cfg.messages_key,
            prompt_key=cfg.prompt_key,
            response_key=cfg.response_key,
            text_key=cfg.text_key,
            system_prompt=cfg.system_prompt,
            sample_weight_key=cfg.sample_weight_key,
        )
        encoder = formats.RowEncoder(fmt, tokenizer, vocab_size)
        logger.info(
            "tokenizing %d %s rows from %s with %d worker(s)",
            len(rows),
            kind,
            ", ".join(paths),
            cfg.num_workers,
        )
        encoded = rows.map(
            _encode_batch,
            batched=True,
            batch_size=256,
            num_proc=cfg.num_workers if cfg.num_workers > 1 and len(rows) > 256 else None,
            remove_columns=rows.column_names,
            fn_kwargs={
                "encoder": encoder,
                "seq_length": seq_length,
                "truncation": cfg.truncation,
            },
            features=datasets.Features(
                {
                    "input_ids": datasets.Sequence(datasets.Value("int32")),
                    "target_mask": datasets.Sequence(datasets.Value("int8")),
                    "weight": datasets.Value("float32"),
                    "targets": datasets.Value("int32"),
                    "status": datasets.Value("int8"),
                    SOURCE: datasets.Value("string"),
                }
            ),
            cache_file_name=str(work / "encoded.arrow"),
            desc="tokenizing",
        )
        status = np.asarray(encoded["status"], dtype=np.int64)
        counts = np.bincount(status, minlength=len(formats.STATUS_NAMES))
        sources = encoded[SOURCE] if counts[1:].any() else []
        locations = {
            name: [sources[i] for i in np.flatnonzero(status == code)[:_MAX_REPORTED]]
            for code, name in enumerate(formats.STATUS_NAMES)
            if code != formats.OK and counts[code]
        }
        kept_idx = np.flatnonzero((status == formats.OK) | (status == formats.TRUNCATED))
        samples = encoded.select(kept_idx).remove_columns(["status"])
        samples.save_to_disk(str(work / "samples"))
        lengths = _lengths(samples)
        targets = _column_sum(samples, "targets")
        stats = SFTDataStats(
            rows=len(rows) + bad.count,
            bad_rows=bad.count,
            bad_row_locations=bad.first,
            outcomes={n: int(c) for n, c in zip(formats.STATUS_NAMES, counts, strict=True)},
            outcome_locations=locations,
            samples=len(samples),
            tokens=int(lengths.sum() + len(lengths)),
            target_tokens=targets,
        )
        if stats.samples == 0:
            raise DataError(
                f"{', '.join(paths)}: no sample left after filtering ("
                + "; ".join(stats.lines())
                + "); check the keys, --truncation and --seq-length"
            )
        (work / "stats.json").write_text(json.dumps(asdict(stats)))
        shutil.rmtree(work / "rows", ignore_errors=True)
        (work / "encoded.arrow").unlink(missing_ok=True)
        if done.exists():  # another process finished first
            shutil.rmtree(work, ignore_errors=True)
        else:
            os.replace(work, done)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return datasets.load_from_disk(str(done / "samples")), stats


def _column(samples, name: str):
    """One column as a pyarrow array, through the dataset's own indexing (a selected subset
    has an indices mapping that the underlying table does not apply)."""
    return samples.select_columns([name]).with_format("arrow")[:][name]


def _column_sum(samples, name: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(_column(samples, name)).as_py() or 0)


def _lengths(samples) -> np.ndarray:
    """Positions each sample fills (tokens - 1)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(_column(samples, "input_ids"))
    return np.asarray(lengths.to_numpy(zero_copy_only=False)) - 1


class SFTDataset:
    """Packed (or padded) sequences of SFT samples; see the module docstring."""

    def __init__(
        self,
        samples,
        seq_length: int,
        pad_id: int,
        *,
        packing: bool,
        seed: int,
        stats: SFTDataStats | None = None,
    ):
        self.samples = samples.with_format(None)
        self.seq_length = seq_length
        self.pad_id = pad_id
        lengths = _lengths(samples)
        order = np.random.default_rng(seed).permutation(len(lengths))
        if packing:
            bins = pack(lengths[order], seq_length)
            self.bins = [order[b] for b in bins]
        else:
            self.bins = [order[i : i + 1] for i in range(len(order))]
        self.tokens = int(lengths.sum())  # positions holding a sample token
        if stats is not None:
            stats.sequences, stats.seq_length = len(self.bins), seq_length
            stats.packing_efficiency = self.packing_efficiency

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def packing_efficiency(self) -> float:
        """Fraction of positions that hold a sample token rather than padding."""
        return self.tokens / max(len(self.bins) * self.seq_length, 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.samples[self.bins[index].tolist()]
        docs = list(zip(rows["input_ids"], rows["target_mask"], rows["weight"], strict=True))
        return assemble(docs, self.seq_length, self.pad_id)

    def documents(self, index: int) -> list[str]:
        """Where the samples of sequence `index` come from (file:line)."""
        return list(self.samples[self.bins[index].tolist()][SOURCE])


def split_validation(samples, fraction: float, seed: int):
    """A seeded random `fraction` of the samples for validation -> (train, valid)."""
    n = len(samples)
    n_valid = round(n * fraction)
    if n_valid == 0 or n_valid == n:
        raise DataError(
            f"--valid-fraction {fraction} of {n} samples leaves {n - n_valid} for training and "
            f"{n_valid} for validation; change the fraction or give --valid-data"
        )
    perm = np.random.default_rng(seed + 7919).permutation(n)
    return samples.select(np.sort(perm[n_valid:])), samples.select(np.sort(perm[:n_valid]))


def build_sft_datasets(
    cfg: DataConfig,
    tokenizer,
    seq_length: int,
    seed: int,
    vocab_size: int | None = None,
    *,
    eval_only: bool = False,
) -> tuple[SFTDataset | None, SFTDataset | None, SFTDataStats]:
    """(train, validation, the training data's stats) from --sft-data and --valid-data /
    --valid-fraction. With `eval_only` and no validation data, --sft-data is the
    validation set (train is None)."""

    pad_id = _pad_id(tokenizer)
    samples, stats = prepare_sft_rows(
        split_paths(cfg.sft_data), cfg, tokenizer, seq_length, vocab_size
    )
    valid_samples = None
    if cfg.valid_data:
        valid_samples, _ = prepare_sft_rows(
            split_paths(cfg.valid_data), cfg, tokenizer, seq_length, vocab_size
        )
    elif cfg.valid_fraction:
        samples, valid_samples = split_validation(samples, cfg.valid_fraction, seed)
    elif eval_only:
        samples, valid_samples = None, samples

    def make(s, st=None):
        return SFTDataset(s, seq_length, pad_id, packing=cfg.packing, seed=seed, stats=st)

    train = make(samples, stats) if samples is not None else None
    valid = make(valid_samples) if valid_samples is not None else None
    if train is None:
        stats.sequences, stats.seq_length = len(valid), seq_length
        stats.packing_efficiency = valid.packing_efficiency
    return train, valid, stats


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
