"""The model provider for Megatron-LM's trainer: DFTGPTModel from Megatron-LM's args.

The counterpart of the `model_provider` that Megatron-LM's `pretrain_gpt.py` passes to
`pretrain`: Megatron-LM's own TransformerConfig (`core_transformer_config_from_args`, so every
model, precision, FP8, MoE and recompute flag means what it means there), the layer spec
Megatron-LM would pick (Transformer Engine's where `--transformer-impl transformer_engine`,
Megatron-Core's local modules otherwise; the decoder block spec with MoE; qk-layernorm,
multi-latent attention), MTP where configured, and GPTModel's constructor arguments from the
same flags. The one difference is the class: `DFTGPTModel`, whose language-model loss is the
vocab-parallel DFT cross-entropy and whose padded vocabulary columns are masked out of it.
"""

from __future__ import annotations

import argparse

from megatron.core.models.gpt import gpt_layer_specs

from dft_megatron.loss import TokenWeighting
from dft_megatron.models.gpt import DFTGPTModel


def layer_spec(args: argparse.Namespace, config, vp_stage: int | None):
    """Megatron-LM's choice of decoder spec for these args (dense layer or MoE block)."""
    use_te = args.transformer_impl == "transformer_engine"
    if args.num_experts:
        return gpt_layer_specs.get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=use_te,
            normalization=args.normalization,
            qk_l2_norm=args.qk_l2_norm,
            vp_stage=vp_stage,
        )
    common = dict(
        num_experts=None,
        moe_grouped_gemm=False,
        qk_layernorm=args.qk_layernorm,
        multi_latent_attention=args.multi_latent_attention,
        qk_l2_norm=args.qk_l2_norm,
    )
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    return gpt_layer_specs.get_gpt_layer_local_spec(**common, normalization=args.normalization)


def gpt_model_kwargs_from_args(
    args: argparse.Namespace,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config=None,
    pg_collection=None,
) -> dict:
    """Megatron-Core GPTModel's constructor arguments for the model the args describe (shared by
    DFTGPTModel and the plain-GPTModel reference of the benchmarks, so both build the same
    network)."""
    from megatron.training.arguments import core_transformer_config_from_args

    if config is None:
        config = core_transformer_config_from_args(args)
    spec = layer_spec(args, config, vp_stage)
    mtp_spec = None
    if args.mtp_num_layers:
        layer = spec.layer_specs[-1] if hasattr(spec, "layer_specs") else spec
        mtp_spec = gpt_layer_specs.get_gpt_mtp_block_spec(
            config,
            layer,
            use_transformer_engine=args.transformer_impl == "transformer_engine",
            vp_stage=vp_stage,
        )
    return dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def build_dft_gpt_model(
    args: argparse.Namespace,
    weighting: TokenWeighting,
    unpadded_vocab_size: int,
    **kwargs,
) -> DFTGPTModel:
    """One (virtual) pipeline stage of the GPT model the args describe, with the DFT loss;
    `kwargs` as `gpt_model_kwargs_from_args` takes them."""
    return DFTGPTModel(
        **gpt_model_kwargs_from_args(args, **kwargs),
        loss_weighting=weighting,
        unpadded_vocab_size=unpadded_vocab_size,
        output_chunk_tokens=args.dft_output_chunk_tokens if args.dft_chunked_output_layer else None,
    )


def model_vocab_size(args: argparse.Namespace, tokenizer_vocab_size: int) -> int:
    """The vocabulary the model's softmax covers: the tokenizer's, or --vocab-size where that is
    larger (a converted model whose embedding has rows beyond its tokenizer's, as Qwen2.5's
    151936 for 151665 tokens: transformers' logits include them). Rows past it, up to the
    padded size, are padding and are masked out of the loss."""
    return min(max(args.vocab_size or 0, tokenizer_vocab_size), args.padded_vocab_size)


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config=None,
    pg_collection=None,
) -> DFTGPTModel:
    """`pretrain(model_provider=...)`: reads Megatron-LM's global args (the outermost entry)."""
    from megatron.training import get_args, get_tokenizer

    from dft_megatron.training.arguments import token_weighting

    args = get_args()
    return build_dft_gpt_model(
        args,
        token_weighting(args),
        model_vocab_size(args, get_tokenizer().vocab_size),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        config=config,
        pg_collection=pg_collection,
    )
