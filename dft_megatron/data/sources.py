"""Rows from files: JSON Lines, JSON, Parquet, Arrow and `datasets.save_to_disk` folders.

Everything becomes one Hugging Face `datasets.Dataset` (memory-mapped Arrow on disk), the
files' rows concatenated in the order given. JSON is parsed here, line by line, so that a
malformed row is reported by file and line (or, with `skip_bad_rows`, counted and reported
with its location); each row keeps its location in a `__source__` column so that later
errors (a missing key, a bad value) can name it too. JSON rows are stored as their JSON
text (one string column) and decoded where they are tokenized: rows of one file need not
share a schema.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = "__source__"
JSON_ROW = "__json__"
_MAX_REPORTED = 5


class DataError(ValueError):
    """Bad data: the message names the file (and line or row) and what to do."""


@dataclass
class BadRows:
    """Rows skipped for malformed JSON (--skip-bad-rows): how many, and where the first were."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.first) < _MAX_REPORTED:
            self.first.append(f"{where}: {why}")

    def merge(self, other: BadRows) -> None:
        self.count += other.count
        self.first = (self.first + other.first)[:_MAX_REPORTED]


def _json_lines(path: Path, skip_bad_rows: bool, bad: BadRows):
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if not skip_bad_rows:
                    raise DataError(
                        f"{where}: not a valid JSON object ({e}); fix the line or pass "
                        "--skip-bad-rows to skip such rows"
                    ) from None
                bad.add(where, str(e))
                continue
            yield {JSON_ROW: line, SOURCE: where}


def _json_file(path: Path, skip_bad_rows: bool, bad: BadRows):
    """A .json file: one array of objects, or JSON Lines under a .json name."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _json_lines(path, skip_bad_rows, bad)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); a .json file holds one "
            "array of objects (or use JSON Lines, one object per line)"
        ) from None
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        if not isinstance(row, dict):
            if not skip_bad_rows:
                raise DataError(
                    f"{where}: a JSON {type(row).__name__}, not an object; fix it or pass "
                    "--skip-bad-rows"
                )
            bad.add(where, f"a JSON {type(row).__name__}, not an object")
            continue
        yield {JSON_ROW: json.dumps(row), SOURCE: where}


def _kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "saved"
        raise DataError(
            f"{path}: a folder that is not a datasets.save_to_disk folder (no "
            "dataset_info.json); give the data files themselves"
        )
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    kinds = {
        ".jsonl": "jsonl",
        ".jsonl.gz": "jsonl",
        ".ndjson": "jsonl",
        ".json": "json",
        ".parquet": "parquet",
        ".arrow": "arrow",
    }
    if suffix not in kinds:
        raise DataError(
            f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .parquet, .arrow "
            "or a datasets.save_to_disk folder"
        )
    return kinds[suffix]


def _generate(datasets, reader, **kwargs):
    """Dataset.from_generator, with our own DataError surfacing as itself."""
    try:
        return datasets.Dataset.from_generator(reader, **kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _with_source(ds, path: Path, label: str):
    return ds.add_column(SOURCE, [f"{path}:{label} {i}" for i in range(len(ds))])


def load_rows(paths: list[str], cache_dir: str | Path, skip_bad_rows: bool = False):
    """The rows of `paths`, concatenated -> (datasets.Dataset, BadRows)."""
    import datasets

    parts, bad = [], BadRows()
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        kind = _kind(path)
        if kind in ("jsonl", "json"):
            if path.suffix == ".gz":
                raise DataError(f"{path}: compressed JSON Lines: decompress it first (gunzip)")
            # Written to Arrow on disk as it is read; `cache_dir` is this build's own folder,
            # so the generator always runs (and counts bad rows) rather than hitting a cache.
            file_bad = BadRows()
            reader = _json_lines if kind == "jsonl" else _json_file
            ds = _generate(
                datasets,
                reader,
                gen_kwargs={"path": path, "skip_bad_rows": skip_bad_rows, "bad": file_bad},
                features=datasets.Features(
                    {JSON_ROW: datasets.Value("string"), SOURCE: datasets.Value("string")}
                ),
                cache_dir=str(cache_dir),
            )
            bad.merge(file_bad)
        elif kind == "parquet":
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
            ds = _with_source(ds, path, "row")
        elif kind == "arrow":
            ds = datasets.Dataset.from_file(str(path))
            ds = _with_source(ds, path, "row")
        else:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(
                        f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)}); "
                        "save the split to use"
                    )
                ds = ds["train"]
            ds = _with_source(ds, path, "row")
        logger.info("read %d rows from %s", len(ds), path)
        parts.append(ds)
    if bad.count:
        logger.warning(
            "skipped %d malformed rows (--skip-bad-rows); first: %s",
            bad.count,
            "; ".join(bad.first),
        )
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return rows, bad


def decode_row(row: dict) -> dict:
    """A row as stored by `load_rows` -> the row's own fields (JSON decoded)."""
    if JSON_ROW in row:
        return json.loads(row[JSON_ROW])
    return {k: v for k, v in row.items() if k != SOURCE}
