"""Generate the quickstart math data: train.jsonl, a harder held-out test.jsonl, a tokenizer.

    python tools/make_math_data.py --output-dir data/math --train-size 20000 --test-size 500 \\
        --seed 1234

Rows are {"problem", "solution", "answer", "kind", "difficulty"}; solutions are step by step
and end with `The answer is \\boxed{ANSWER}.` (train with `--prompt-key problem
--response-key solution`, evaluate on test.jsonl's `problem` / `answer`). The tokenizer is a
byte-level BPE with a ChatML template, trained on the training split
(dft_megatron/data/math_problems.py and tokenizer.py describe both).
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from dft_megatron.data.math_problems import (
    KINDS,
    TEST_DIFFICULTIES,
    TRAIN_DIFFICULTIES,
    make_math_data,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="folder for the files (created)")
    parser.add_argument("--train-size", type=int, required=True, help="training rows")
    parser.add_argument("--test-size", type=int, required=True, help="held-out (hard) rows")
    parser.add_argument("--seed", type=int, default=1234, help="generator seed")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=1024,
        help="tokenizer vocabulary, special tokens included (an upper bound: BPE stops "
        "earlier when the corpus has no pair left to merge)",
    )
    parser.add_argument(
        "--no-tokenizer", action="store_true", help="write the JSONL files only, no tokenizer/"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated problem kinds (default: all of {','.join(KINDS)})",
    )
    parser.add_argument(
        "--train-difficulties",
        default=",".join(TRAIN_DIFFICULTIES),
        help=f"comma-separated difficulties of the training split (default: "
        f"{','.join(TRAIN_DIFFICULTIES)})",
    )
    parser.add_argument(
        "--test-difficulties",
        default=",".join(TEST_DIFFICULTIES),
        help=f"comma-separated difficulties of the held-out split (default: "
        f"{','.join(TEST_DIFFICULTIES)}; the training ones give an in-distribution held-out split)",
    )
    args = parser.parse_args(argv)
    split = lambda value: tuple(v.strip() for v in value.split(",") if v.strip())  # noqa: E731

    with tqdm(total=args.train_size + args.test_size, desc="problems", unit="row") as bar:
        summary = make_math_data(
            args.output_dir,
            args.train_size,
            args.test_size,
            args.seed,
            vocab_size=None if args.no_tokenizer else args.vocab_size,
            progress=bar.update,
            kinds=split(args.kinds),
            train_difficulties=split(args.train_difficulties),
            test_difficulties=split(args.test_difficulties),
        )
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
