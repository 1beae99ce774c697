"""Hugging Face <-> Megatron-Core: configs, tensor names and shapes of the llama, mistral,
qwen2, qwen3, qwen3_moe and mixtral families.

Config: `hf_to_model_config` reads transformers' LlamaConfig / MistralConfig / Qwen2Config /
Qwen3Config / Qwen3MoeConfig / MixtralConfig into a `ModelConfig` and `model_config_to_hf`
writes one back. What the mapping cannot express exactly (a sliding window, a RoPE scaling
other than Llama-3's, biases the family does not have, another activation, router jitter,
routing Megatron-Core does another way) is refused with the reason: never converted
approximately.

Tensors: every Hugging Face tensor is one block of one Megatron-Core parameter of the model
built at TP1 x PP1 with the local layer spec (`dist_checkpointing` reshards it to any
TP x PP, and its sharded keys are the Transformer Engine spec's). [d: head dim, nh: heads,
ng: query groups, r = nh / ng, h: hidden, f: ffn hidden, V: vocabulary, Vp: padded rows]

    HF                                        Megatron-Core
    model.embed_tokens.weight [V, h]          embedding.word_embeddings.weight [Vp, h], rows :V
    model.layers.i.input_layernorm.weight     decoder.layers.i.input_layernorm.weight
    ...self_attn.q_proj.weight [nh*d, h]      decoder.layers.i.self_attention.linear_qkv.weight
    ...self_attn.k_proj.weight [ng*d, h]        [ng*(r+2)*d, h]: per query group g the r query
    ...self_attn.v_proj.weight [ng*d, h]        heads of g, then k_g, then v_g (d rows each)
    ...self_attn.{q,k,v}_proj.bias (qwen2)    ...linear_qkv.bias, the same layout
    ...self_attn.o_proj.weight [h, nh*d]      ...self_attention.linear_proj.weight
    ...post_attention_layernorm.weight        ...pre_mlp_layernorm.weight
    ...mlp.gate_proj.weight [f, h]            ...mlp.linear_fc1.weight [2f, h] rows :f
    ...mlp.up_proj.weight [f, h]              ...mlp.linear_fc1.weight rows f: (SwiGLU: gate, up)
    ...mlp.down_proj.weight [h, f]            ...mlp.linear_fc2.weight
    model.norm.weight                         decoder.final_layernorm.weight
    lm_head.weight [V, h] (untied)            output_layer.weight [Vp, h], rows :V
  qwen3, qwen3_moe (qk_layernorm; Megatron-Core normalizes each head before RoPE, as HF):
    ...self_attn.q_norm.weight [d]            ...self_attention.q_layernorm.weight
    ...self_attn.k_norm.weight [d]            ...self_attention.k_layernorm.weight
  MoE layers (E experts of width fm; HF's prefix `mlp.` in qwen3_moe, `block_sparse_moe.`
  in mixtral, whose expert weights are w1 = gate, w3 = up, w2 = down):
    ...mlp.gate.weight [E, h]                 ...mlp.router.weight
    ...mlp.experts.j.gate_proj.weight [fm, h] ...mlp.experts.local_experts.j.linear_fc1.weight
    ...mlp.experts.j.up_proj.weight [fm, h]     [2fm, h]: rows :fm gate, fm: up
    ...mlp.experts.j.down_proj.weight [h, fm] ...mlp.experts.local_experts.j.linear_fc2.weight

Query heads: Hugging Face's `repeat_kv` serves query head j with key/value head j // r, so
HF rows [g*r*d, (g+1)*r*d) of q_proj are group g's query heads, as Megatron-Core's
`SelfAttention.get_query_key_value_tensors` splits each group's [(r + 2) * d] rows. RoPE:
both rotate the two halves of each head (`rotate_half`; Megatron-Core's default, not the
interleaved layout of Meta's original checkpoints), so no row permutation is needed.
Padded vocabulary rows are zero on import and dropped on export.

Experts: the names are those of Megatron-Core's SequentialMLP at EP1 (the model conversion
builds); the checkpoint stores every expert's tensors under one sharded key with an expert
axis (`mlp.experts.linear_fc1.weight`), which any --expert-model-parallel-size and
--expert-tensor-parallel-size reads, and which TEGroupedMLP (--moe-grouped-gemm) reads as well:
Megatron-Core keeps the two modules' checkpoint keys interchangeable. Routing: HF takes the top
k of the softmax over all experts and (norm_topk_prob, always in Mixtral) renormalizes them,
which is Megatron-Core's softmax over the top-k logits; without renormalization it is
--moe-router-pre-softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dft_megatron.models.config import ModelConfig

# Hugging Face architecture -> ModelConfig.family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
MOE_FAMILIES = ("qwen3_moe", "mixtral")
# The MoE block's module name in each family's HF checkpoints, and its experts' tensor names
# for (gate, up, down).
MOE_PREFIX = {"qwen3_moe": "mlp.", "mixtral": "block_sparse_moe."}
EXPERT_NAMES = {
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}
HF_FAMILIES = {family: arch for arch, family in ARCHITECTURES.items()}

# Llama-3.x RoPE scaling as Megatron-Core implements it (`RotaryEmbedding._apply_scaling`):
# only the factor is a parameter there, these three are fixed.
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Sequence length stored in a converted checkpoint (the paper's max length; the trainer's
# --seq-length overrides it, and it does not change the weights).
DEFAULT_SEQ_LENGTH = 2048


class ConversionError(ValueError):
    """Input that cannot be converted exactly; the message says what and why."""


def _supported() -> str:
    return ", ".join(f"{a} ({f})" for a, f in ARCHITECTURES.items())


def _rope(hf) -> dict:
    """The RoPE parameters of a transformers config (v5 `rope_parameters`, or v4's
    `rope_theta` + `rope_scaling`) as one dict with rope_type and rope_theta."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def hf_to_model_config(
    hf,
    *,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> ModelConfig:
    """A transformers config (`AutoConfig.from_pretrained(HF_DIR)`) -> ModelConfig.

    The vocabulary is padded to a multiple of `make_vocab_size_divisible_by` x
    `tensor_model_parallel_size` (Megatron-LM's rule), and the padded size is fixed in the
    result (every TP size that divides it loads the checkpoint).
    """
    where = f"config.json of {getattr(hf, '_name_or_path', '') or 'the model'}"
    archs = list(getattr(hf, "architectures", None) or [])
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConversionError(
            f"{where}: architectures {archs} is not supported; supported: {_supported()}"
        )
    family = ARCHITECTURES[archs[0]]

    def refuse(reason: str):
        raise ConversionError(f"{where} ({archs[0]}): {reason}; not converted")

    if getattr(hf, "hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf.hidden_act!r}: the SwiGLU mapping needs 'silu'")
    # Qwen2 configs carry a sliding_window that use_sliding_window=false switches off.
    window = getattr(hf, "sliding_window", None)
    if getattr(hf, "use_sliding_window", None) is False:
        window = None
    if window is not None:
        refuse(
            f"sliding-window attention (sliding_window={window}): Megatron-Core's attention "
            "here is full causal attention, so the logits would differ past the window"
        )
    layer_types = set(getattr(hf, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        refuse(f"layer_types {sorted(layer_types)}: only full_attention layers are supported")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        refuse(
            f"biases (attention_bias={getattr(hf, 'attention_bias', False)}, "
            f"mlp_bias={getattr(hf, 'mlp_bias', False)}): the {family} mapping has none"
        )
    partial = getattr(hf, "partial_rotary_factor", 1.0)
    if partial != 1.0:
        refuse(f"partial_rotary_factor {partial}: only full rotary embeddings are supported")

    rope = _rope(hf)
    rope_type = rope["rope_type"]
    rope_scaling, rope_factor = False, 8.0
    if rope_type == "llama3":
        for key, value in LLAMA3_ROPE_FIXED.items():
            if rope.get(key) != value:
                refuse(
                    f"llama3 RoPE scaling with {key}={rope.get(key)}: Megatron-Core implements "
                    f"it with {key}={value} only"
                )
        rope_scaling, rope_factor = True, float(rope["factor"])
    elif rope_type != "default":
        refuse(
            f"RoPE scaling type {rope_type!r}: supported are none ('default') and 'llama3' "
            "(Megatron-Core's Llama-3.x scaling)"
        )
    theta = float(rope["rope_theta"])
    rotary_base = int(theta) if theta.is_integer() else theta

    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    max_pos = hf.max_position_embeddings
    moe = _moe_config(hf, family, refuse) if family in MOE_FAMILIES else {}
    model = ModelConfig(
        family=family,
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or heads,
        kv_channels=None if head_dim * heads == hf.hidden_size else head_dim,
        ffn_hidden_size=hf.intermediate_size,
        seq_length=min(DEFAULT_SEQ_LENGTH, max_pos),
        max_position_embeddings=max_pos,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        normalization="RMSNorm",
        norm_epsilon=hf.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
        qk_layernorm=family in QK_NORM_FAMILIES,
        **moe,
        vocab_size=hf.vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        init_method_std=getattr(hf, "initializer_range", 0.02),
        # Hugging Face's decoders have no hidden dropout; fine-tuning recipes keep it off.
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
    )
    model.validate()
    model.padded_vocab_size = model.embedding_rows(tensor_model_parallel_size)
    return model


def _moe_config(hf, family: str, refuse: Callable[[str], None]) -> dict:
    """The ModelConfig MoE fields of a Qwen3-MoE or Mixtral config."""
    experts = getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", None)
    if not experts:
        refuse(f"num_experts {experts}: a {family} model without experts is not an MoE model")
    if getattr(hf, "router_jitter_noise", 0.0):
        refuse(
            f"router_jitter_noise {hf.router_jitter_noise}: not part of the model; train with "
            "Megatron-LM's --moe-input-jitter-eps instead (a config without it converts)"
        )
    if getattr(hf, "shared_expert_intermediate_size", 0):
        refuse("shared experts: the qwen3_moe and mixtral mappings have none")
    layers = hf.num_hidden_layers
    if family == "qwen3_moe":
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        width, pre_softmax = hf.moe_intermediate_size, not hf.norm_topk_prob
    else:
        pattern, width, pre_softmax = [1] * layers, hf.intermediate_size, False
    if not any(pattern):
        refuse("no layer has experts (mlp_only_layers / decoder_sparse_step): convert it as qwen3")
    return dict(
        num_experts=experts,
        moe_router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=width,
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_router_pre_softmax=pre_softmax,
    )


# Megatron-LM MoE args that change the math in ways no supported HF family has, with the
# value the mapping needs (an export of a checkpoint trained with another is refused).
MOE_ARGS_NEEDED = {
    "moe_router_score_function": "softmax",
    "moe_router_enable_expert_bias": False,
    "moe_router_topk_scaling_factor": None,
    "moe_shared_expert_intermediate_size": None,
    "moe_router_num_groups": None,
    "moe_latent_size": None,
    "moe_apply_probs_on_input": False,
    "moe_shared_expert_gate": False,
}


def moe_args_problems(args) -> list[str]:
    """What in a Megatron-LM checkpoint's MoE args no Hugging Face family expresses."""
    if not getattr(args, "num_experts", None):
        return []
    problems = []
    for name, needed in MOE_ARGS_NEEDED.items():
        value = getattr(args, name, needed)
        if value != needed and not (needed is None and not value):
            problems.append(
                f"--{name.replace('_', '-')} {value!r}: the Hugging Face MoE families "
                f"(Qwen3-MoE, Mixtral) need {needed!r}"
            )
    return problems


def model_config_to_hf(model: ModelConfig, **token_ids):
    """ModelConfig -> the family's transformers config (LlamaConfig, MistralConfig,
    Qwen2Config, Qwen3Config, Qwen3MoeConfig or MixtralConfig). `token_ids`: bos_token_id,
    eos_token_id, pad_token_id where known."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        # transformers 4.x reads RoPE from rope_theta/rope_scaling and would ignore the
        # rope_parameters written here (silently dropping Llama-3 scaling).
        raise ConversionError(
            f"export writes transformers >= 5 configs (rope_parameters); this is "
            f"transformers {transformers.__version__}: pip install 'transformers>=5'"
        )
    if model.family not in HF_FAMILIES:
        raise ConversionError(
            f"model family {model.family!r} has no Hugging Face mapping; supported families: "
            f"{', '.join(HF_FAMILIES)}"
        )
    expected = {
        "position_embedding_type": "rope",
        "normalization": "RMSNorm",
        "swiglu": True,
        "add_bias_linear": False,
        "add_qkv_bias": model.family == "qwen2",
        "rotary_percent": 1.0,
        "qk_layernorm": model.family in QK_NORM_FAMILIES,
    }
    for name, value in expected.items():
        if getattr(model, name) != value:
            raise ConversionError(
                f"a {model.family} model needs {name}={value!r} for the Hugging Face "
                f"{HF_FAMILIES[model.family]} layout; this checkpoint has "
                f"{getattr(model, name)!r}"
            )
    if bool(model.num_experts) != (model.family in MOE_FAMILIES):
        raise ConversionError(
            f"a {model.family} model {'needs' if model.family in MOE_FAMILIES else 'has no'} "
            f"experts for the Hugging Face {HF_FAMILIES[model.family]} layout; this checkpoint "
            f"has --num-experts {model.num_experts}"
        )
    if model.family == "mixtral" and not all(model.moe_layers()):
        raise ConversionError(
            f"MixtralConfig has experts in every layer; this checkpoint's --moe-layer-freq is "
            f"{model.moe_layer_freq}"
        )
    if model.family == "mixtral" and model.moe_router_pre_softmax:
        raise ConversionError(
            "Mixtral renormalizes the top-k router probabilities; this checkpoint was trained "
            "with --moe-router-pre-softmax (no renormalization): export it as qwen3_moe"
        )
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    if model.family == "qwen2" and head_dim * model.num_attention_heads != model.hidden_size:
        raise ConversionError(
            f"Qwen2Config has no head_dim: kv_channels {model.kv_channels} x "
            f"{model.num_attention_heads} heads must equal hidden_size {model.hidden_size}"
        )
    rope = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": float(model.rotary_base),
            "factor": float(model.rope_scaling_factor),
            **LLAMA3_ROPE_FIXED,
        }
    kwargs = dict(
        architectures=[HF_FAMILIES[model.family]],
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        rope_parameters=rope,
        attention_dropout=model.attention_dropout,
        **token_ids,
    )
    if model.family == "llama":
        return transformers.LlamaConfig(
            **kwargs, head_dim=head_dim, attention_bias=False, mlp_bias=False
        )
    if model.family == "mistral":
        return transformers.MistralConfig(**kwargs, head_dim=head_dim, sliding_window=None)
    if model.family == "qwen2":
        return transformers.Qwen2Config(**kwargs, use_sliding_window=False)
    qwen3 = dict(head_dim=head_dim, attention_bias=False, use_sliding_window=False)
    if model.family == "qwen3":
        return transformers.Qwen3Config(**kwargs, **qwen3)
    moe = dict(num_experts_per_tok=model.moe_router_topk, output_router_logits=False)
    if model.family == "mixtral":
        kwargs["intermediate_size"] = model.moe_ffn_hidden_size
        return transformers.MixtralConfig(
            **kwargs, **moe, num_local_experts=model.num_experts, head_dim=head_dim,
            sliding_window=None, router_jitter_noise=0.0,
        )  # fmt: skip
    return transformers.Qwen3MoeConfig(
        **kwargs, **qwen3, **moe, num_experts=model.num_experts,
        moe_intermediate_size=model.moe_ffn_hidden_size,
        norm_topk_prob=not model.moe_router_pre_softmax, decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe_layer in enumerate(model.moe_layers()) if not moe_layer],
    )  # fmt: skip


# ------------------------------------------------------------------ tensors


@dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor and the block of a Megatron-Core parameter that holds it."""

    hf_name: str
    megatron_name: str
    hf_shape: tuple[int, ...]
    block: Callable[[torch.Tensor], torch.Tensor]
    """Megatron-Core parameter -> a view of the block, shaped [*]: the HF tensor reshaped to
    the view's shape is the block (import: `view.copy_(hf.reshape(view.shape))`; export:
    `view.reshape(hf_shape)`)."""


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _rows(lo: int, hi: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[lo:hi]


def _qkv(groups: int, per_group: int, head_dim: int, lo: int, hi: int):
    """Rows of heads [lo, hi) of every query group: q heads are 0..r-1, k is r, v is r + 1."""
    return lambda t: t.view(groups, per_group + 2, head_dim, *t.shape[1:])[:, lo:hi]


def tensor_maps(model: ModelConfig) -> list[TensorMap]:
    """Every Hugging Face tensor of `model`, in the order the files list them."""
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    nh, ng = model.num_attention_heads, model.num_query_groups
    d = model.kv_channels or h // nh
    r = nh // ng
    moe_layers = model.moe_layers()
    maps = []

    def add(hf: str, megatron: str, shape: tuple[int, ...], block=_whole) -> None:
        maps.append(TensorMap(hf, megatron, shape, block))

    add("model.embed_tokens.weight", "embedding.word_embeddings.weight", (v, h), _rows(0, v))
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, qkv, mlp = hf + "self_attn.", mg + "self_attention.linear_qkv.", mg + "mlp."
        add(hf + "input_layernorm.weight", mg + "input_layernorm.weight", (h,))
        for kind in ("weight", "bias") if model.add_qkv_bias else ("weight",):
            tail = (h,) if kind == "weight" else ()
            add(f"{attn}q_proj.{kind}", qkv + kind, (nh * d, *tail), _qkv(ng, r, d, 0, r))
            add(f"{attn}k_proj.{kind}", qkv + kind, (ng * d, *tail), _qkv(ng, r, d, r, r + 1))
            add(f"{attn}v_proj.{kind}", qkv + kind, (ng * d, *tail), _qkv(ng, r, d, r + 1, r + 2))
        add(attn + "o_proj.weight", mg + "self_attention.linear_proj.weight", (h, nh * d))
        if model.qk_layernorm:
            add(attn + "q_norm.weight", mg + "self_attention.q_layernorm.weight", (d,))
            add(attn + "k_norm.weight", mg + "self_attention.k_layernorm.weight", (d,))
        add(hf + "post_attention_layernorm.weight", mg + "pre_mlp_layernorm.weight", (h,))
        if moe_layers[i]:
            moe = hf + MOE_PREFIX[model.family]
            gate, up, down = EXPERT_NAMES[model.family]
            fm = model.moe_ffn_hidden_size
            add(moe + "gate.weight", mlp + "router.weight", (model.num_experts, h))
            for j in range(model.num_experts):
                hf_e, mg_e = f"{moe}experts.{j}.", f"{mlp}experts.local_experts.{j}."
                add(f"{hf_e}{gate}.weight", mg_e + "linear_fc1.weight", (fm, h), _rows(0, fm))
                add(f"{hf_e}{up}.weight", mg_e + "linear_fc1.weight", (fm, h), _rows(fm, 2 * fm))
                add(f"{hf_e}{down}.weight", mg_e + "linear_fc2.weight", (h, fm))
            continue
        add(hf + "mlp.gate_proj.weight", mlp + "linear_fc1.weight", (f, h), _rows(0, f))
        add(hf + "mlp.up_proj.weight", mlp + "linear_fc1.weight", (f, h), _rows(f, 2 * f))
        add(hf + "mlp.down_proj.weight", mlp + "linear_fc2.weight", (h, f))
    add("model.norm.weight", "decoder.final_layernorm.weight", (h,))
    if model.untie_embeddings_and_output_weights:
        add("lm_head.weight", "output_layer.weight", (v, h), _rows(0, v))
    return maps


def padded_rows(model: ModelConfig) -> dict[str, slice]:
    """Megatron-Core parameters with padded vocabulary rows -> those rows (no HF tensor)."""
    pad = slice(model.vocab_size, model.padded_vocab_size)
    out = {"embedding.word_embeddings.weight": pad}
    if model.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = pad
    return out


def check_coverage(model: ModelConfig, params: dict[str, torch.Tensor]) -> None:
    """The blocks of `tensor_maps` plus the padded rows add up to every parameter's size, and
    every block has its HF tensor's size; raise otherwise (meta tensors work).

    A cheap guard on this module's own mapping (the import writes into uninitialized memory);
    tests/convert checks element by element on a small model that no block overlaps another.
    """
    counts = {name: 0 for name in params}
    for m in tensor_maps(model):
        if m.megatron_name not in params:
            raise AssertionError(f"{m.hf_name} maps to {m.megatron_name}, not in the model")
        block = m.block(params[m.megatron_name])
        if block.numel() != math.prod(m.hf_shape):
            raise AssertionError(f"{m.hf_name}: block of {block.shape} vs HF {m.hf_shape}")
        counts[m.megatron_name] += block.numel()
    for name, rows in padded_rows(model).items():
        counts[name] += params[name][rows].numel()
    wrong = {n: (c, params[n].numel()) for n, c in counts.items() if c != params[n].numel()}
    if wrong:
        raise AssertionError(f"mapping does not cover the model exactly: {wrong}")
