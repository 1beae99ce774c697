"""The architecture as Megatron-LM flags, and back.

`model_flags(ModelConfig)` is the Megatron-LM command line of a model (what a converted
checkpoint stores as its args, and what a user would pass to build it from scratch);
`model_config_from_args(args)` reads an args Namespace (a checkpoint's, or a parsed command
line) back into the ModelConfig that conversion maps to Hugging Face. The family (gpt, llama,
qwen2, mistral, qwen3, qwen3_moe, mixtral) travels as dft_megatron's `--model-family`; a
checkpoint of plain Megatron-LM has none and gets the family its layout implies.
"""

from __future__ import annotations

import argparse

from dft_megatron.models.config import ModelConfig


def model_flags(model: ModelConfig) -> list[str]:
    """Megatron-LM flags that build `model` (vocabulary rows aside: see padded_vocab_size)."""
    flags = [
        f"--num-layers={model.num_layers}",
        f"--hidden-size={model.hidden_size}",
        f"--ffn-hidden-size={model.ffn_hidden_size}",
        f"--num-attention-heads={model.num_attention_heads}",
        f"--seq-length={model.seq_length}",
        f"--max-position-embeddings={model.max_position_embeddings}",
        f"--position-embedding-type={model.position_embedding_type}",
        f"--normalization={model.normalization}",
        f"--norm-epsilon={model.norm_epsilon}",
        f"--init-method-std={model.init_method_std}",
        f"--hidden-dropout={model.hidden_dropout}",
        f"--attention-dropout={model.attention_dropout}",
        f"--make-vocab-size-divisible-by={model.make_vocab_size_divisible_by}",
        f"--vocab-size={model.vocab_size}",
        f"--model-family={model.family}",
    ]
    if model.num_query_groups != model.num_attention_heads:
        flags += ["--group-query-attention", f"--num-query-groups={model.num_query_groups}"]
    if model.kv_channels is not None:
        flags.append(f"--kv-channels={model.kv_channels}")
    if model.position_embedding_type == "rope":
        flags += [f"--rotary-base={model.rotary_base}", f"--rotary-percent={model.rotary_percent}"]
        if model.rope_scaling:
            flags += ["--use-rope-scaling", f"--rope-scaling-factor={model.rope_scaling_factor}"]
    if model.swiglu:
        flags.append("--swiglu")
    if not model.add_bias_linear:
        flags.append("--disable-bias-linear")
    if model.add_qkv_bias:
        flags.append("--add-qkv-bias")
    if model.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    if model.qk_layernorm:
        flags.append("--qk-layernorm")
    if model.num_experts:
        freq = model.moe_layer_freq
        # Megatron-LM reads a per-layer pattern as a Python list expression.
        pattern = "[" + ",".join(map(str, freq)) + "]" if isinstance(freq, list) else freq
        flags += [
            f"--num-experts={model.num_experts}",
            f"--moe-router-topk={model.moe_router_topk}",
            f"--moe-ffn-hidden-size={model.moe_ffn_hidden_size}",
            f"--moe-layer-freq={pattern}",
        ]
        if model.moe_router_pre_softmax:
            flags.append("--moe-router-pre-softmax")
    return flags


def _family(args: argparse.Namespace) -> str:
    family = getattr(args, "model_family", None)
    if family:
        return family
    if args.position_embedding_type != "rope":
        return "gpt"
    if getattr(args, "num_experts", None):
        return "qwen3_moe" if args.qk_layernorm else "mixtral"
    if args.qk_layernorm:
        return "qwen3"
    return "qwen2" if args.add_qkv_bias else "llama"


def model_config_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a Megatron-LM args Namespace (validated: derived sizes are set).
    The vocabulary: `vocab_size`, else --vocab-size, else the padded rows."""
    vocab = vocab_size or getattr(args, "vocab_size", None) or args.padded_vocab_size
    return ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        seq_length=args.seq_length,
        max_position_embeddings=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        rotary_base=int(args.rotary_base),
        rotary_percent=args.rotary_percent,
        rope_scaling=bool(args.use_rope_scaling),
        rope_scaling_factor=args.rope_scaling_factor,
        normalization=args.normalization,
        norm_epsilon=args.layernorm_epsilon,
        swiglu=bool(args.swiglu),
        add_bias_linear=bool(args.add_bias_linear),
        add_qkv_bias=bool(args.add_qkv_bias),
        untie_embeddings_and_output_weights=bool(args.untie_embeddings_and_output_weights),
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        num_experts=getattr(args, "num_experts", None) or None,
        moe_router_topk=getattr(args, "moe_router_topk", 2),
        moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None),
        moe_layer_freq=getattr(args, "moe_layer_freq", 1),
        moe_router_pre_softmax=bool(getattr(args, "moe_router_pre_softmax", False)),
        vocab_size=vocab,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        padded_vocab_size=args.padded_vocab_size,
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        family=_family(args),
    )
