"""JSON Lines text -> Megatron-Core indexed dataset (.bin/.idx) for pre-training.

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model TOKENIZER_DIR \\
        --output-prefix data/corpus --append-eod --workers 8

writes data/corpus_text_document.bin/.idx (one per --json-keys key), the prefix that
`--data-path` takes. Flags follow Megatron-LM's tools/preprocess_data.py; the tokenizer is a
Hugging Face tokenizer folder. dft_megatron/data/indexed.py describes the format and the
handling of bad rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from tqdm import tqdm

from dft_megatron.data.indexed import preprocess_jsonl
from dft_megatron.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSON Lines file, one document per line")
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each"
    )
    parser.add_argument("--tokenizer-model", required=True, help="Hugging Face tokenizer folder")
    parser.add_argument(
        "--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx"
    )
    parser.add_argument(
        "--append-eod", action="store_true", help="end every document with the EOS token"
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument(
        "--log-interval", type=int, default=10000, help="print throughput every N rows"
    )
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip lines that are not JSON objects (counted, first few reported) instead of "
        "stopping at the first one",
    )
    args = parser.parse_args(argv)
    setup_logging()

    start = time.perf_counter()
    state = {"docs": 0, "bytes": 0, "next_log": args.log_interval}
    with tqdm(total=os.path.getsize(args.input), unit="B", unit_scale=True, desc="tokenize") as bar:

        def progress(rows: int, nbytes: int) -> None:
            bar.update(nbytes)
            state["docs"] += rows
            state["bytes"] += nbytes
            if args.log_interval > 0 and state["docs"] >= state["next_log"]:
                state["next_log"] += args.log_interval
                elapsed = time.perf_counter() - start
                bar.write(
                    f"{state['docs']} rows ({state['docs'] / elapsed:.1f} rows/s, "
                    f"{state['bytes'] / elapsed / 2**20:.2f} MB/s)"
                )

        summary = preprocess_jsonl(
            args.input,
            args.tokenizer_model,
            args.output_prefix,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            skip_bad_rows=args.skip_bad_rows,
            progress=progress,
        )
    result = dataclasses.asdict(summary)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # JsonlFormatError is a ValueError: file:line, reason
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
