"""Show what the trainer will train on: processed SFT samples with the target tokens marked,
and statistics (rows, tokens, target fraction, truncated and dropped rows, packing).

    python tools/inspect_sft_data.py --sft-data train.jsonl --tokenizer-model TOKENIZER \\
        --seq-length 2048 [--prompt-key problem --response-key solution] [--show 3] \\
        [--dump-jsonl processed.jsonl]

Takes the trainer's data flags (see --help); target tokens are printed inside ⟦ ⟧.
"""

from __future__ import annotations

import argparse
import sys

from dft_megatron.data import DataConfig, DataError, build_sft_datasets, load_tokenizer
from dft_megatron.data.inspect import dump_jsonl, render_sequence
from dft_megatron.utils.flags import add_fields
from dft_megatron.utils.logging import setup_logging

SKIP = {"mock_data", "data_path", "split", "valid_data", "valid_fraction"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_fields(
        parser.add_argument_group("data (the trainer's flags)"),
        DataConfig,
        only={f for f in DataConfig.__dataclass_fields__ if f not in SKIP},
        # The trainer's spelling of these (Megatron-LM's --data-cache-path; --num-workers is
        # Megatron-LM's data loader, tokenization is --preprocess-workers).
        renamed={"data_cache_dir": "data-cache-path", "num_workers": "preprocess-workers"},
    )
    parser.add_argument("--seq-length", type=int, required=True, help="positions per sequence")
    parser.add_argument("--seed", type=int, default=1234, help="the trainer's --seed")
    parser.add_argument("--show", type=int, default=3, help="sequences to print (default 3)")
    parser.add_argument("--dump-jsonl", metavar="PATH", help="write every processed sequence")
    args = vars(parser.parse_args(argv))
    seq_length, seed, show, dump = (
        args.pop(k) for k in ("seq_length", "seed", "show", "dump_jsonl")
    )
    args["data_cache_dir"] = args.pop("data_cache_path")
    args["num_workers"] = args.pop("preprocess_workers")
    cfg = DataConfig(**{k: v for k, v in args.items() if v is not None or k == "sft_data"})
    setup_logging()
    if not cfg.sft_data:
        parser.error("--sft-data is required")
    try:
        tokenizer = (
            load_tokenizer(cfg.tokenizer_model, cfg.chat_template) if cfg.tokenizer_model else None
        )
        _, data, stats = build_sft_datasets(cfg, tokenizer, seq_length, seed, eval_only=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i in range(min(show, len(data))):
        print(f"=== sequence {i} ({', '.join(data.documents(i))}) ===")
        print(render_sequence(data[i], tokenizer))
    print("=== statistics ===")
    for line in stats.lines():
        print(line)
    if dump:
        n = dump_jsonl(data, dump)
        print(f"wrote {n} sequences to {dump}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
