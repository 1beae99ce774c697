"""The architecture description: one dataclass that says what GPT-family model to build.

It is what a checkpoint stores (so `--load` needs no model flags), what the trainer's
Megatron-LM style flags fill, and what Hugging Face conversion maps to and from. Field
names are Megatron-LM's argument names, with its defaults.

Families, as Megatron-LM flags express them:
- gpt:   learned absolute positions, LayerNorm, GeLU MLP, biases, tied embeddings.
- llama: rope, RMSNorm, SwiGLU, no biases, untied embeddings (Llama-3.x: rope_scaling).
- qwen2: llama plus qkv bias (`add_qkv_bias`), tied embeddings in the small models.
- qwen3: llama plus RMSNorm of each query and key head (`qk_layernorm`), a head dimension
  of its own (`kv_channels`), no biases.
- qwen3_moe: qwen3 with routed experts (`num_experts`, `moe_router_topk`,
  `moe_ffn_hidden_size`), dense MLPs in the layers `moe_layer_freq` marks 0.
- mixtral: llama (mistral without a sliding window) with routed experts in every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FAMILIES = ("gpt", "llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "mixtral")


@dataclass
class ModelConfig:
    """A GPT-family decoder; field names and defaults are Megatron-LM's."""

    num_layers: int = 2
    """Transformer layers."""

    hidden_size: int = 64
    """Model width."""

    num_attention_heads: int = 4
    """Attention (query) heads."""

    ffn_hidden_size: int | None = None
    """MLP width; None: 4 x hidden_size (8/3 x hidden_size rounded up to 64 with swiglu is
    not implied: give it explicitly for Llama-style models)."""

    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None: as many as attention heads."""

    kv_channels: int | None = None
    """Per-head dimension; None: hidden_size / num_attention_heads."""

    seq_length: int = 128
    """Training sequence length in tokens."""

    max_position_embeddings: int | None = None
    """Positions the model supports; None: seq_length."""

    position_embedding_type: str = "learned_absolute"
    """"learned_absolute" or "rope"."""

    rotary_base: int = 10000
    """RoPE base (theta)."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates."""

    rope_scaling: bool = False
    """Llama-3.1/3.2 RoPE frequency scaling (low/high frequency factors 1 and 4, original
    context 8192, as Megatron-Core implements it)."""

    rope_scaling_factor: float = 8.0
    """Llama-3.x RoPE scaling factor: 8 for Llama-3.1, 32 for Llama-3.2."""

    normalization: str = "LayerNorm"
    """"LayerNorm" or "RMSNorm"."""

    norm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""

    swiglu: bool = False
    """SwiGLU MLP (gated SiLU) instead of GeLU."""

    add_bias_linear: bool = True
    """Biases in the linear layers (Megatron-LM's --disable-bias-linear turns them off)."""

    add_qkv_bias: bool = False
    """Bias in the QKV projection only (Qwen2), also with add_bias_linear off."""

    qk_layernorm: bool = False
    """Normalization of each query and key head before RoPE (Qwen3's q_norm / k_norm)."""

    num_experts: int | None = None
    """Routed experts of a mixture-of-experts MLP; None: a dense MLP in every layer."""

    moe_router_topk: int = 2
    """Experts each token is routed to."""

    moe_ffn_hidden_size: int | None = None
    """Width of each expert's MLP (Qwen3-MoE's moe_intermediate_size); None: ffn_hidden_size."""

    moe_layer_freq: int | list[int] = 1
    """Which layers are MoE: every N-th (an int), or one 0 (dense) / 1 (MoE) per layer."""

    moe_router_pre_softmax: bool = False
    """Softmax over all experts, then the top k, unnormalized (Qwen3-MoE's norm_topk_prob
    false). False: softmax over the top-k logits, i.e. the top-k probabilities renormalized."""

    untie_embeddings_and_output_weights: bool = False
    """Separate output layer instead of reusing the input embedding."""

    vocab_size: int = 128
    """Tokenizer vocabulary size, before padding."""

    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the TP size."""

    padded_vocab_size: int | None = None
    """Rows of the embedding and output layer. None: vocab_size rounded up to a multiple of
    make_vocab_size_divisible_by x TP when the model is first built; then fixed (checkpoints
    store it), so that every TP size loads the same rows."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialization."""

    hidden_dropout: float = 0.1
    """Dropout after attention and MLP."""

    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""

    family: str = "gpt"
    """Model family (one of FAMILIES): names the layout for conversion and logs."""

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_experts and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size

    def validate(self) -> None:
        """Raise ValueError naming the flag when the description is inconsistent."""

        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        need(self.family in FAMILIES, f"--family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0")
        need(
            self.position_embedding_type in ("learned_absolute", "rope"),
            "--position-embedding-type must be rope or learned_absolute, got "
            f"{self.position_embedding_type!r}",
        )
        need(
            self.normalization in ("LayerNorm", "RMSNorm"),
            f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}",
        )
        need(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({self.num_query_groups})",
        )
        need(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
            f"({self.num_attention_heads}), or give --kv-channels",
        )
        need(
            self.seq_length <= self.max_position_embeddings
            or self.position_embedding_type == "rope",
            f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings "
            f"({self.max_position_embeddings}) with learned absolute positions",
        )
        need(
            self.padded_vocab_size is None or self.padded_vocab_size >= self.vocab_size,
            f"--padded-vocab-size ({self.padded_vocab_size}) must be >= --vocab-size "
            f"({self.vocab_size})",
        )
        need(
            0.0 <= self.hidden_dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0,
            "--hidden-dropout and --attention-dropout must be in [0, 1)",
        )
        if self.num_experts:
            need(
                0 < self.moe_router_topk <= self.num_experts,
                f"--moe-router-topk ({self.moe_router_topk}) must be in 1..--num-experts "
                f"({self.num_experts})",
            )
            if isinstance(self.moe_layer_freq, list):
                need(
                    len(self.moe_layer_freq) == self.num_layers
                    and set(self.moe_layer_freq) <= {0, 1},
                    f"--moe-layer-freq {self.moe_layer_freq}: one 0 (dense) or 1 (MoE) per "
                    f"layer, {self.num_layers} in all",
                )

    def moe_layers(self) -> list[bool]:
        """Per layer: whether its MLP is the mixture of experts (Megatron-LM's moe_layer_freq)."""
        if not self.num_experts:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]
        return [bool(x) for x in self.moe_layer_freq]

    def embedding_rows(self, tp_size: int) -> int:
        """Vocabulary rows of the embedding at TP size `tp_size` (see padded_vocab_size)."""
        if self.padded_vocab_size is not None:
            if self.padded_vocab_size % tp_size:
                raise ValueError(
                    f"the padded vocabulary ({self.padded_vocab_size} rows, fixed by the "
                    f"checkpoint) is not divisible by --tensor-model-parallel-size ({tp_size})"
                )
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """Fields that change the parameters' shapes or meaning, where the two differ.

        Dropout, init and sequence length do not make a checkpoint incompatible.
        """
        free = {"hidden_dropout", "attention_dropout", "init_method_std", "seq_length"}
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in free and getattr(self, f.name) != getattr(other, f.name)
        ]
