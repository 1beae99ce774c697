"""SFT data preparation throughput and packing efficiency.

Measured in one run on the same rows (generated step-by-step math problems,
dft_megatron.data.math_problems, in the prompt/response format) with the bundled quickstart
tokenizer (examples/data/math/tokenizer, ChatML template):

  dft_prepare   dft_megatron's preparation from the JSON Lines file: read and check every
                row, render the chat template, tokenize once with offsets, derive the
                prompt mask from the assistant spans, fit to the sequence length, count
                the outcomes, save to the on-disk cache; then pack (best-fit decreasing)
  hf_map        the reference (1.00): `datasets` reads the same file and one `map` call
                renders the template and tokenizes each row (`apply_chat_template(...,
                tokenize=True)`), with no mask, no checks and no packing: the least a
                trainer can do

Both run with the same number of worker processes and a fresh cache each repetition; the
reported figure is rows per second (median over repetitions) and the ratio of the medians.
The packing efficiency is the fraction of positions of the packed sequences that hold a
sample token (the target: >= 95% at --seq-length 2048).

    python -m benchmarks.bench_data [--rows 20000] [--seq-length 2048] [--workers 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import command_line, versions

TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "data" / "math" / "tokenizer"


def _rows(n: int, path: Path) -> None:
    from dft_megatron.data.math_problems import iter_unique_problems, write_jsonl

    stream = iter_unique_problems(seed=7, difficulties=("easy", "medium", "hard"))
    write_jsonl((next(stream) for _ in range(n)), path)


def _dft_prepare(path: Path, tokenizer, seq_length: int, workers: int, cache: Path):
    from dft_megatron.data import DataConfig, SFTDataset
    from dft_megatron.data.sft import prepare_sft_rows

    cfg = DataConfig(
        sft_data=[str(path)],
        prompt_key="problem",
        response_key="solution",
        data_cache_dir=str(cache),
        num_workers=workers,
    )
    samples, stats = prepare_sft_rows([str(path)], cfg, tokenizer, seq_length)
    packed = SFTDataset(samples, seq_length, 0, packing=True, seed=1234, stats=stats)
    return packed, stats


def _hf_map(path: Path, tokenizer, workers: int, cache: Path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))

    def tokenize(batch):
        return {
            "input_ids": [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": s}],
                    tokenize=True,
                )
                for p, s in zip(batch["problem"], batch["solution"], strict=True)
            ]
        }

    return ds.map(
        tokenize,
        batched=True,
        num_proc=workers if workers > 1 else None,
        remove_columns=ds.column_names,
        cache_file_name=str(cache / "mapped.arrow"),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="generated rows")
    parser.add_argument("--seq-length", type=int, default=2048, help="positions per sequence")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes, both")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each")
    args = parser.parse_args(argv)

    import datasets

    from dft_megatron.data import load_tokenizer

    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING)
    tokenizer = load_tokenizer(TOKENIZER)
    seconds = {"dft_prepare": [], "hf_map": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "math.jsonl"
        _rows(args.rows, data)
        for rep in range(args.reps):
            order = ("dft_prepare", "hf_map") if rep % 2 == 0 else ("hf_map", "dft_prepare")
            for name in order:
                cache = Path(tmp) / f"cache-{name}-{rep}"
                cache.mkdir()
                t0 = time.perf_counter()
                if name == "dft_prepare":
                    packed, stats = _dft_prepare(
                        data, tokenizer, args.seq_length, args.workers, cache
                    )
                else:
                    _hf_map(data, tokenizer, args.workers, cache)
                seconds[name].append(time.perf_counter() - t0)

    rate = {k: args.rows / statistics.median(v) for k, v in seconds.items()}
    print(f"# {command_line()}")
    print(f"# {versions()}")
    print(f"# {args.rows} rows, {args.workers} worker(s), median of {args.reps}")
    print("| path | rows/s | vs hf_map |")
    print("|---|---:|---:|")
    for name in ("dft_prepare", "hf_map"):
        print(f"| {name} | {rate[name]:,.0f} | {rate[name] / rate['hf_map']:.2f}x |")
    eff = packed.packing_efficiency
    print()
    print(
        f"packing at --seq-length {args.seq_length}: {stats.samples} samples -> "
        f"{len(packed)} sequences, efficiency {eff:.1%} "
        f"({'meets' if eff >= 0.95 else 'below'} the 95% target); "
        f"mean sample {stats.tokens / stats.samples:.0f} tokens"
    )


if __name__ == "__main__":
    main()
