"""tools/init_hf_model.py's library side: a random-init Hugging Face model that transformers
loads as it is, sized by a ModelConfig, with the tokenizer's vocabulary."""

from __future__ import annotations

import pytest

from dft_megatron.convert.families import ConversionError
from dft_megatron.convert.hf_init import init_hf_model
from dft_megatron.models import ModelConfig
from tests.data.conftest import make_tokenizer


def _qwen2(**kw):
    return ModelConfig(
        family="qwen2",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        seq_length=64,
        max_position_embeddings=64,
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        **kw,
    )


def test_init_hf_model_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = make_tokenizer(tmp_path / "tok")
    out = init_hf_model(_qwen2(), tmp_path / "tok", tmp_path / "hf", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tok.chat_template
    ids = torch.tensor([[1, 5, 7]])
    assert model(ids).logits.shape == (1, 3, len(tok))
    # Seeded: the same seed gives the same weights.
    again = init_hf_model(_qwen2(), tmp_path / "tok", tmp_path / "hf2", seed=3)
    other = AutoModelForCausalLM.from_pretrained(str(again))
    torch.testing.assert_close(model.lm_head.weight, other.lm_head.weight, rtol=0, atol=0)
    with pytest.raises(ConversionError, match="not empty; pass --force"):
        init_hf_model(_qwen2(), tmp_path / "tok", tmp_path / "hf", seed=3)
