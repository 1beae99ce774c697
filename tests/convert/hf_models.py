"""Tiny random-init Hugging Face models of each supported family, written like a hub folder.

Every parameter is random (norm weights around 1, biases too), so that a tensor mapped to
the wrong place changes the logits; std 0.1 gives logits of order 1-10. The tokenizer is a
character-level WordLevel one (tokenizers), saved as PreTrainedTokenizerFast.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96  # padded to 128 embedding rows by the import (64 per rank at TP2)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,+-=*/()"
SPECIAL = ["<unk>", "<s>", "</s>"]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per group
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    # Llama-3.2: rope_theta 500000, llama3 scaling with factor 32 and 8192 original positions.
    "llama": lambda t: t.LlamaConfig(
        **COMMON,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "mistral": lambda t: t.MistralConfig(
        **COMMON,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Qwen2.5 small models: qkv bias, tied embeddings; stored in bf16 like the hub's.
    "qwen2": lambda t: t.Qwen2Config(
        **COMMON,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Qwen3: q/k norms, a head dimension of its own (32, not 64 / 4), tied embeddings (as
    # Qwen3-0.6B..4B); bf16 like the hub's.
    "qwen3": lambda t: t.Qwen3Config(
        **COMMON,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Qwen3-MoE: 4 experts of width 32, top 2 without renormalization (norm_topk_prob false:
    # Megatron-Core's --moe-router-pre-softmax), layer 0 dense (mlp_only_layers), untied.
    "qwen3_moe": lambda t: t.Qwen3MoeConfig(
        **COMMON,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Mixtral: experts in every layer, top 2 renormalized, no sliding window.
    "mixtral": lambda t: t.MixtralConfig(
        **{**COMMON, "intermediate_size": 48},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}
DTYPES = {
    "llama": torch.float32,
    "mistral": torch.float32,
    "qwen2": torch.bfloat16,
    "qwen3": torch.bfloat16,
    "qwen3_moe": torch.float32,
    "mixtral": torch.float32,
}
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def hf_config(family: str):
    import transformers

    return CONFIGS[family](transformers)


def save_tokenizer(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)


def save_hf_model(family: str, out: Path, seed: int = 0) -> Path:
    """A random-init `family` model with a tokenizer in `out` (save_pretrained)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.to(DTYPES[family]).save_pretrained(out)
    save_tokenizer(out)
    return out


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits [b, s, V] of `tokens` [b, s]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()
