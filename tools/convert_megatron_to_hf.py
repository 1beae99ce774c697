"""Megatron-LM checkpoint (any TP x PP, with or without optimizer state) -> Hugging Face folder.

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/run --hf-dir hf/run
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('hf/run')"

Reads the torch_dist checkpoints Megatron-LM writes: those of `-m dft_megatron.train --save
ckpt/run` (the iteration latest_checkpointed_iteration.txt names, or --iteration N), the
"release" of tools/convert_hf_to_megatron.py, or plain Megatron-LM's GPT checkpoints of the
Llama / Mistral / Qwen2 layout. The architecture comes from the args stored in the
checkpoint; the tokenizer from ckpt/run/tokenizer.

Runs on CPU in one process (GPUs are hidden; launch it with python, not torchrun): peak memory
about one copy of the model plus one shard. See dft_megatron/convert/megatron_to_hf.py.
"""

from __future__ import annotations

import os

# Conversion is a CPU job; set before torch is imported so that no CUDA path is taken.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import sys  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/convert_megatron_to_hf.py",
        description="Export a Megatron-LM checkpoint (torch_dist) written by "
        "dft_megatron.train, by convert_hf_to_megatron.py or by Megatron-LM, at any TP x PP, "
        "with or without optimizer state, as a Hugging Face folder that "
        "transformers.AutoModelForCausalLM.from_pretrained loads: config.json, "
        "generation_config.json, safetensors shards, tokenizer files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--megatron-dir",
        required=True,
        help="checkpoint folder: the --save DIR of dft_megatron.train (or one of its "
        "iter_NNNNNNN / release folders)",
    )
    p.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="export iter_NNNNNNN of --megatron-dir (default: the one "
        "latest_checkpointed_iteration.txt names, as --load picks it)",
    )
    p.add_argument("--hf-dir", required=True, help="output Hugging Face folder")
    p.add_argument(
        "--force", action="store_true", help="replace the contents of a non-empty --hf-dir"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after writing, compare transformers' logits and CE on the written folder with the "
        "checkpoint's (fp32, CPU); exit 1 beyond fp32 tolerance",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file (5GB = 5 * 10^9 bytes; GiB, MB, ... accepted)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from dft_megatron.convert.families import ConversionError
    from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf, resolve_checkpoint
    from dft_megatron.convert.verify import verify_conversion
    from dft_megatron.utils.logging import setup_logging

    setup_logging()
    try:
        out = convert_megatron_to_hf(
            args.megatron_dir,
            args.hf_dir,
            iteration=args.iteration,
            force=args.force,
            max_shard_size=args.max_shard_size,
        )
        print(f"wrote {out}")
        if args.verify:
            _, checkpoint = resolve_checkpoint(args.megatron_dir, args.iteration)
            result = verify_conversion(out, checkpoint)
            print(f"verify: {result.report()}")
            if not result.passed:
                return 1
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
