"""DFTGPTModel: Megatron-Core's GPTModel with the DFT loss as the model's loss.

Megatron-Core has no spec slot for the loss: GPTModel's forward calls
`self.compute_language_model_loss(labels, logits)` on the last pipeline stage (also inside
multi-token prediction). `DFTGPTModel` overrides exactly that method, so the DFT loss
runs wherever Megatron-Core would run its CE: every TP/PP/CP/SP layout, the TE and local
layer specs. The tensor-parallel group is passed explicitly (the model's own).

Training builds it from Megatron-LM's args (models/provider.py). `transformer_config` and
`build_gpt_model` build it from a `ModelConfig` directly, at a given layout, for code that
drives Megatron-Core itself (the model- and data-level tests, the loss benchmarks), with
Megatron-Core's local layer spec (`transformer_impl="local"`, which runs on CPU) or
Transformer Engine's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.inference.utils import InferenceMode
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from dft_megatron.loss import (
    DFTLossStats,
    TokenWeighting,
    fused_vocab_parallel_dft_cross_entropy,
    vocab_parallel_dft_cross_entropy,
)
from dft_megatron.loss.output_layer import chunked_output_layer_dft_cross_entropy
from dft_megatron.models.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class PrecisionConfig:
    """Parameter and compute precision, Megatron-LM's flags."""

    bf16: bool = False
    """bf16 parameters and activations, fp32 main weights in the optimizer."""

    fp16: bool = False
    """fp16 parameters and activations with dynamic loss scaling."""

    fp8_format: str | None = None
    """FP8 GEMMs through Transformer Engine: "e4m3" or "hybrid" (e4m3 fwd, e5m2 bwd)."""

    fp8_recipe: str = "delayed"
    """TE FP8 recipe: delayed, tensorwise, mxfp8 or blockwise."""

    fp8_margin: int = 0
    """Scaling margin of the delayed recipe."""

    fp8_amax_history_len: int = 1
    """Amax history length of the delayed recipe."""

    fp8_amax_compute_algo: str = "most_recent"
    """"most_recent" or "max" over the amax history."""

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def transformer_config(
    model: ModelConfig,
    precision: PrecisionConfig,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    transformer_impl: str = "local",
    use_cpu_initialization: bool | None = None,
) -> TransformerConfig:
    """Megatron-Core's TransformerConfig for `model` at the given layout and precision."""
    dtype = precision.params_dtype
    fp8 = {}
    if precision.fp8_format is not None:
        fp8 = dict(
            fp8=precision.fp8_format,
            fp8_recipe=precision.fp8_recipe,
            fp8_margin=precision.fp8_margin,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        bf16=precision.bf16,
        fp16=precision.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        # The loss is a global token mean: Megatron's per-token loss path (see training/).
        calculate_per_token_loss=True,
        # Megatron-Core's jit/apex fusions are GPU-only and optional; TE fuses on its own.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Batched p2p posts [send prev, recv prev, send next, recv next] on every rank. gloo
        # matches messages between two ranks by posting order, so at PP 2 (prev == next) in
        # the interleaved schedule's steady state an activation can land in a gradient's
        # receive buffer (seen: wrong losses at PP2 x VP2 with 4 micro-batches). Unbatched,
        # Megatron-Core orders the ops by rank parity, which matches on any backend.
        batch_p2p_comm=torch.cuda.is_available(),
        transformer_impl=transformer_impl,
        **fp8,
    )


def layer_spec(model: ModelConfig, transformer_impl: str):
    """The decoder layer spec for `transformer_impl` ("local" or "transformer_engine")."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=None, moe_grouped_gemm=False, qk_layernorm=False
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=None,
        moe_grouped_gemm=False,
        qk_layernorm=False,
        normalization=model.normalization,
    )


class DFTGPTModel(GPTModel):
    """GPTModel whose language-model loss is the vocab-parallel DFT cross-entropy.

    Extra constructor arguments:
    - `loss_weighting` (a TokenWeighting; "sft" gives Megatron-Core's plain CE).
    - `unpadded_vocab_size`: the tokenizer's vocabulary. The embedding and output layer carry
      `vocab_size` rows, padded up to a multiple of --make-vocab-size-divisible-by x TP; the
      logits of the padded columns would take part in the softmax (a Hugging Face model of
      the same weights has no such columns, so its CE and probabilities would differ). The
      output layer's logits of columns >= `unpadded_vocab_size` are therefore set, in place,
      to the dtype's most negative finite value: exp() of them is exactly 0 after the max
      shift, so loss, gradients, probabilities and the entropy statistic are those of the
      unpadded vocabulary (a finite value, not -inf: 0 * -inf would make the entropy NaN).
      This touches only the rank(s) whose vocabulary shard holds padded columns, and only
      those columns; their gradient is then 0. Returned logits (no labels) carry the same
      values, so argmax or sampling never picks a padded id.

    The loss path: `vocab_parallel_dft_cross_entropy` by default;
    `fused_vocab_parallel_dft_cross_entropy` when the config asks for Megatron-Core's
    `cross_entropy_loss_fusion` (--cross-entropy-loss-fusion); with `output_chunk_tokens`
    (--dft-chunked-output-layer) the output layer and the loss run together over chunks of that
    many tokens (`chunked_output_layer_dft_cross_entropy`: the logits never exist whole), for
    every forward with labels outside inference; without labels the output layer runs as usual.

    While `collect_stats` is True (the default), each forward with labels leaves that
    micro-batch's per-token DFTLossStats in `last_loss_stats`, [b, s] each (last pipeline
    stage only); otherwise `last_loss_stats` is None. The target probability and CE in them
    are free; the entropy costs one more pass over the softmax, so the trainer sets
    `collect_entropy` only for the steps it logs (entropy None otherwise).

    The objective's extras: `token_weights` (a [vocab] table multiplying each target token's
    loss, --token-weights) and, for asft, a frozen reference model (`attach_reference`) whose
    logits give the KL term; its per-token KL is in `last_loss_stats.kl`.
    """

    def __init__(
        self,
        *args,
        loss_weighting: TokenWeighting | None = None,
        unpadded_vocab_size: int | None = None,
        output_chunk_tokens: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.loss_weighting = loss_weighting or TokenWeighting()
        self.output_chunk_tokens = output_chunk_tokens
        self.collect_stats = True
        self.collect_entropy = True
        self.last_loss_stats: DFTLossStats | None = None
        self.token_weights: torch.Tensor | None = None
        """[vocab] per-token-id weights of the objective (--token-weights), or None."""
        self.sft_mix_schedule = None
        """The SFT -> objective schedule (loss/weights.SftMixSchedule), applied by the trainer's
        forward step, or None."""
        # The frozen reference of asft (`attach_reference`); kept out of the registered
        # submodules, so that it is not trained, saved, wrapped or cast with this model.
        object.__setattr__(self, "_reference", None)
        self._ref_logits: torch.Tensor | None = None
        # GPTModel's `vocab_size` is the padded row count.
        self.unpadded_vocab_size = unpadded_vocab_size or self.vocab_size
        if self.unpadded_vocab_size > self.vocab_size:
            raise ValueError(
                f"unpadded_vocab_size ({self.unpadded_vocab_size}) exceeds the model's "
                f"{self.vocab_size} vocabulary rows"
            )
        if self.post_process and self.unpadded_vocab_size < self.vocab_size:
            self.output_layer.register_forward_hook(self._mask_padded_vocab)

    def _mask_padded_vocab(self, module, inputs, output) -> None:
        """Forward hook of the output layer: padded vocabulary columns -> finfo.min, in place."""
        logits = output[0]  # [s, b, v/tp], or [s, b, v] when the layer gathered its output
        width = logits.shape[-1]
        if width == module.output_size_per_partition:
            first = 0 if module.tp_group is None else dist.get_rank(module.tp_group) * width
        else:  # gathered over TP (runtime_gather_output): columns are global ids
            first = 0
        start = max(self.unpadded_vocab_size - first, 0)
        if start < width:
            logits[..., start:].fill_(torch.finfo(logits.dtype).min)

    @property
    def reference(self) -> DFTGPTModel | None:
        return self._reference

    def attach_reference(self, reference: DFTGPTModel) -> None:
        """Give this stage asft's frozen reference: the same stage of the reference model, in
        the same layout. Every forward then runs it first under no_grad on the same inputs;
        on the last stage its logits enter the loss's KL term, on the others its hidden
        states travel with this model's to the next stage, concatenated along the batch
        (the pipeline's messages are [s, 2b, h]; `variable_seq_lengths` must be set in the
        config, so that the schedule exchanges their shapes)."""
        if not self.loss_weighting.needs_reference:
            raise ValueError(
                f"a reference model is used by loss_type 'asft' only, not "
                f"{self.loss_weighting.loss_type!r}"
            )
        reference.requires_grad_(False)
        reference.eval()
        reference.collect_stats = False
        object.__setattr__(self, "_reference", reference)

    def set_input_tensor(self, input_tensor) -> None:
        ref = self._reference
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if ref is None or self.pre_process or tensor is None:
            super().set_input_tensor(input_tensor)
            return
        mine, theirs = tensor.chunk(2, dim=1)  # [s, 2b, h] -> this model's, the reference's
        super().set_input_tensor(mine)
        ref.set_input_tensor(theirs)

    def _loss_kwargs(self) -> dict:
        return dict(
            weighting=self.loss_weighting,
            token_weights=self.token_weights,
            tp_group=self.tp_group,
            return_stats=self.collect_stats,
            return_entropy=self.collect_entropy,
        )

    def _keep_stats(self, out) -> torch.Tensor:
        """The [s, b] loss of `out`; its [s, b] stats go to `last_loss_stats` as [b, s]."""
        self.last_loss_stats = None
        if not self.collect_stats:
            return out
        loss, stats = out
        # [s, b] -> [b, s]
        self.last_loss_stats = DFTLossStats(
            *(None if t is None else t.transpose(0, 1) for t in stats)
        )
        return loss

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """labels [b, s], logits [s, b, v/tp] -> fp32 per-token loss [b, s]."""
        loss_fn = (
            fused_vocab_parallel_dft_cross_entropy
            if self.config.cross_entropy_loss_fusion
            else vocab_parallel_dft_cross_entropy
        )
        target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        extra = {}
        if self._ref_logits is not None:  # [b, s, v/tp] -> [s, b, v/tp], as the policy's
            extra["ref_logits"] = self._ref_logits.transpose(0, 1).contiguous()
        loss = self._keep_stats(loss_fn(logits, target, **self._loss_kwargs(), **extra))
        return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]

    def forward(self, *args, output_processor=None, **kwargs):
        if output_processor is None and self.output_chunk_tokens:
            output_processor = self._chunked_output_and_loss
        ref = self._reference
        if ref is None or InferenceMode.is_active():
            return super().forward(*args, output_processor=output_processor, **kwargs)
        with torch.no_grad():  # the reference's logits (last stage) or hidden states
            ref_out = ref(*args, **{**kwargs, "labels": None})
        if not self.post_process:
            out = super().forward(*args, output_processor=output_processor, **kwargs)
            return torch.cat([out, ref_out], dim=1)  # [s, b, h] x 2 -> [s, 2b, h]
        self._ref_logits = ref_out
        try:
            return super().forward(*args, output_processor=output_processor, **kwargs)
        finally:
            self._ref_logits = None

    def _chunked_output_and_loss(
        self,
        *,
        hidden_states,
        output_layer,
        output_weight,
        labels,
        runtime_gather_output,
        scale_logits,
        **unused,
    ):
        """GPTModel's `output_processor`: [s(/tp), b, h] hidden states -> the [b, s] loss."""
        if labels is None or InferenceMode.is_active():  # logits wanted: the usual layer
            logits, _ = output_layer(
                hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output
            )
            return scale_logits(logits).transpose(0, 1).contiguous()  # [s b v] -> [b s v]
        weight = output_layer.weight if output_weight is None else output_weight
        target = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        out = chunked_output_layer_dft_cross_entropy(
            hidden_states,
            weight,
            target,
            sequence_parallel=output_layer.sequence_parallel,
            chunk_tokens=self.output_chunk_tokens,
            unpadded_vocab_size=self.unpadded_vocab_size,
            **self._loss_kwargs(),
        )
        return self._keep_stats(out).transpose(0, 1).contiguous()  # [s, b] -> [b, s]


def gpt_model_kwargs(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> dict:
    """Megatron-Core GPTModel's constructor arguments for `model` (shared by DFTGPTModel and
    the plain-GPTModel references in tests and benchmarks, so both build the same network)."""
    return dict(
        config=config,
        transformer_layer_spec=layer_spec(model, config.transformer_impl),
        vocab_size=model.embedding_rows(config.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        vp_stage=vp_stage,
    )


def build_gpt_model(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    loss_weighting: TokenWeighting,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> DFTGPTModel:
    """One pipeline stage (or virtual stage `vp_stage`) of `model` on this rank."""
    return DFTGPTModel(
        **gpt_model_kwargs(
            model, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        ),
        loss_weighting=loss_weighting,
        unpadded_vocab_size=model.vocab_size,
    )
