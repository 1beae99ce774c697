"""A randomly initialized Hugging Face model (Qwen2, Llama or Mistral layout) with a given
tokenizer, e.g. the CPU quickstart's tiny Qwen2:

    python tools/init_hf_model.py --family qwen2 --tokenizer-model examples/data/math/tokenizer \\
        --num-layers 4 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 \\
        --ffn-hidden-size 384 --output-dir runs/tiny-qwen2

The result loads with transformers' AutoModelForCausalLM and converts with
tools/convert_hf_to_megatron.py like a downloaded model.
"""

from __future__ import annotations

import argparse
import sys

# The family's fixed layout (what the Hugging Face classes implement).
FAMILY_DEFAULTS = {
    "qwen2": dict(add_qkv_bias=True, rotary_base=1000000, norm_epsilon=1e-6),
    "llama": dict(untie_embeddings_and_output_weights=True, rotary_base=500000),
    "mistral": dict(untie_embeddings_and_output_weights=True, rotary_base=1000000),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILY_DEFAULTS), default="qwen2")
    p.add_argument("--tokenizer-model", required=True, help="Hugging Face tokenizer folder")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--ffn-hidden-size", type=int, default=384, help="SwiGLU width")
    p.add_argument("--max-position-embeddings", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--force", action="store_true", help="replace a non-empty --output-dir")
    args = p.parse_args(argv)

    from dft_megatron.convert.families import ConversionError
    from dft_megatron.convert.hf_init import init_hf_model
    from dft_megatron.models import ModelConfig
    from dft_megatron.utils.logging import setup_logging

    setup_logging()
    model = ModelConfig(
        family=args.family,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.max_position_embeddings,
        max_position_embeddings=args.max_position_embeddings,
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **FAMILY_DEFAULTS[args.family],
    )
    try:
        init_hf_model(
            model, args.tokenizer_model, args.output_dir, seed=args.seed, force=args.force
        )
    except (ConversionError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
