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
import logging

from megatron.core.models.gpt import gpt_layer_specs

from dft_megatron.loss import TokenWeighting
from dft_megatron.models.gpt import DFTGPTModel

logger = logging.getLogger(__name__)


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
    """`pretrain(model_provider=...)`: reads Megatron-LM's global args (the outermost entry).

    Beside the DFT loss: the --token-weights table, the --sft-mix-decay-iters schedule and,
    for --loss-type asft, the frozen reference stage loaded from --ref-load."""
    from megatron.training import get_args, get_tokenizer

    from dft_megatron.training.arguments import sft_mix_schedule, token_weighting

    args = get_args()
    vocab = model_vocab_size(args, get_tokenizer().vocab_size)
    stage = dict(
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        config=config,
        pg_collection=pg_collection,
    )
    model = build_dft_gpt_model(args, token_weighting(args), vocab, **stage)
    model.sft_mix_schedule = sft_mix_schedule(args)
    if args.token_weights and post_process:  # the loss runs on the last stage only
        model.token_weights = _token_weights(args, vocab)
    if model.loss_weighting.needs_reference:
        model.attach_reference(build_reference(args, vocab, model, stage))
    return model


def _token_weights(args: argparse.Namespace, vocab: int):
    """The --token-weights table over the model's vocabulary (logged once, by the last
    stage's first TP and DP rank)."""
    from megatron.core import parallel_state

    from dft_megatron.data.sft import load_tokenizer
    from dft_megatron.loss.token_weights import load_token_weights

    if args.tokenizer_type != "HuggingFaceTokenizer":
        raise ValueError("--token-weights needs a Hugging Face tokenizer (--tokenizer-model DIR)")
    weights, counts = load_token_weights(
        args.token_weights, load_tokenizer(args.tokenizer_model, None), vocab
    )
    first = parallel_state.get_tensor_model_parallel_rank() == 0
    if first and parallel_state.get_data_parallel_rank() == 0:
        where = ", ".join(f"{n} ids from {k}" for k, n in sorted(counts.items()))
        logger.info(
            "--token-weights %s: %d ids, weights %.3g to %.3g (%s)",
            args.token_weights,
            vocab,
            float(weights.min()),
            float(weights.max()),
            where,
        )
    return weights


def build_reference(args: argparse.Namespace, vocab: int, policy: DFTGPTModel, stage: dict):
    """asft's reference: this pipeline stage of the same architecture, in the policy's dtype
    and device, its weights loaded from --ref-load with Megatron-LM's own loader (any
    layout's checkpoint, resharded to this one), frozen. The pipeline carries both models'
    activations ([s, 2b, h]), so the config gets `variable_seq_lengths`."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dft_megatron.training.arguments import on_cpu

    ref = build_dft_gpt_model(args, TokenWeighting("sft"), vocab, **stage)
    ref.to(dtype=next(policy.parameters()).dtype)
    if torch.cuda.is_available() and not on_cpu():
        ref.cuda(torch.cuda.current_device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        policy.config.variable_seq_lengths = True
    load_reference(args, ref)
    params = sum(p.numel() for p in ref.parameters())
    if not dist.is_initialized() or dist.get_rank() == 0:
        weight_mib = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
        tokens = args.micro_batch_size * args.seq_length
        shard = args.padded_vocab_size // args.tensor_model_parallel_size
        logits_mib = tokens * shard * (4 + ref.config.params_dtype.itemsize) / 2**20
        logger.info(
            "asft reference from %s (rank 0's stage): %d parameters, %.1f MiB of weights; per "
            "micro-batch in flight its logits add %.1f MiB ([%d tokens, %d vocab/TP] in the "
            "model's dtype, and as an fp32 softmax kept for backward)",
            args.ref_load,
            params,
            weight_mib,
            logits_mib,
            tokens,
            shard,
        )
    return ref


def load_reference(args: argparse.Namespace, ref: DFTGPTModel) -> None:
    """Megatron-LM's load_checkpoint of --ref-load into `ref`: weights only (as --finetune
    loads them: no optimizer, RNG or iteration), whatever --ckpt-step says of --load."""
    from megatron.training.checkpointing import load_checkpoint

    saved = {k: getattr(args, k, None) for k in _REF_LOAD_OVERRIDES}
    for key, value in _REF_LOAD_OVERRIDES.items():
        setattr(args, key, value)
    try:
        load_checkpoint([ref], None, None, load_arg="ref_load", strict=True)
    finally:
        for key, value in saved.items():
            setattr(args, key, value)


_REF_LOAD_OVERRIDES = {
    "finetune": True,
    "no_load_optim": True,
    "no_load_rng": True,
    "ckpt_step": None,
    "pretrained_checkpoint": None,
}
