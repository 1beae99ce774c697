"""Hugging Face folder -> Megatron-LM checkpoint (torch_dist), with an optional logits check.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-Math-1.5B --megatron-dir ckpt/qwen
    torchrun ... -m dft_megatron.train --load ckpt/qwen --finetune ...   # any TP x PP

The output is a checkpoint in Megatron-LM's own format, as Megatron-LM's converters write a
model: ckpt/qwen/latest_checkpointed_iteration.txt ("release"), ckpt/qwen/release/ (torch_dist
files: the weights, and the args that describe the architecture) and ckpt/qwen/tokenizer/ (the
Hugging Face tokenizer). `-m dft_megatron.train --load ckpt/qwen`, with or without
--finetune (and --eval-only), loads it without model flags, at iteration 0 with a fresh
optimizer, at any TP x PP whose sizes divide its heads, layers and padded vocabulary.

Runs on CPU in one process (GPUs are hidden; launch it with python, not torchrun): peak
memory about one copy of the model in the target dtype. See
dft_megatron/convert/hf_to_megatron.py.
"""

from __future__ import annotations

import os

# Conversion is a CPU job; set before torch is imported so that no CUDA path is taken.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import sys  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/convert_hf_to_megatron.py",
        description="Convert a Hugging Face Llama / Mistral / Qwen2 folder (config.json + "
        "safetensors) into a Megatron-LM checkpoint (torch_dist, a 'release' checkpoint with "
        "the architecture in its args, and the tokenizer in DIR/tokenizer) that "
        "`-m dft_megatron.train --load DIR` loads without model flags, with or without "
        "--finetune (and with --eval-only), at any TP x PP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--hf-dir", required=True, help="Hugging Face model folder (local)")
    p.add_argument(
        "--megatron-dir",
        required=True,
        help="output checkpoint folder: the --load DIR of dft_megatron.train",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype of the saved weights (default: config.json's dtype)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace the contents of a non-empty --megatron-dir"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after saving, compare the saved checkpoint's logits and CE with transformers' "
        "(fp32, CPU; holds one fp32 copy of the model); exit 1 beyond fp32 tolerance",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this x --tensor-model-parallel-size",
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="only sets the padding multiple; the checkpoint loads at every TP size that "
        "divides the heads and the padded vocabulary (query groups: a multiple or a divisor "
        "of it; Megatron-Core replicates them over TP ranks when fewer)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from dft_megatron.convert.families import ConversionError
    from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from dft_megatron.convert.verify import verify_conversion
    from dft_megatron.utils.logging import setup_logging

    setup_logging()
    try:
        path = convert_hf_to_megatron(
            args.hf_dir,
            args.megatron_dir,
            dtype=args.dtype,
            force=args.force,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
        )
        print(f"wrote {path}")
        if args.verify:
            result = verify_conversion(args.hf_dir, args.megatron_dir)
            print(f"verify: {result.report()}")
            if not result.passed:
                return 1
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
