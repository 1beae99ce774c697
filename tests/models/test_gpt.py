"""DFTGPTModel: the DFT loss inside Megatron-Core's GPTModel, for each model family.

The models have a vocabulary of 96 padded to 128 embedding rows (64 per rank at TP2: rank 1
holds 32 real and 32 padded columns). References, fp32, with the same weights:
- loss_type="sft": Megatron-Core's own GPTModel whose loss is torch's `F.cross_entropy` over
  the first 96 columns of its all-gathered logits, i.e. the model without vocabulary padding
  (a Hugging Face model's CE): per-token loss to 1e-6, every parameter gradient to 1e-5
  relative + 1e-6 absolute (the two CE implementations round differently). The same
  GPTModel's own `vocab_parallel_cross_entropy` over all 128 columns differs from it (the
  padded columns take part in its softmax).
- loss_type="dft": the per-token DFT weight sg(p) applied to that same CE.
- Logits without labels: equal to Megatron-Core's in the real columns, the dtype's finite
  minimum in the padded ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from dft_megatron.compat import install_cpu_bridge
from dft_megatron.loss import TokenWeighting
from dft_megatron.models import ModelConfig, PrecisionConfig, build_gpt_model, transformer_config
from dft_megatron.models.gpt import gpt_model_kwargs
from tests.dist import pool

FAMILIES = {
    "gpt": ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=96,
        seq_length=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "llama3.2": ModelConfig(
        family="llama",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=176,
        seq_length=16,
        position_embedding_type="rope",
        rotary_base=500000,
        rope_scaling=True,
        rope_scaling_factor=32.0,
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        vocab_size=96,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "qwen2": ModelConfig(
        family="qwen2",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=176,
        seq_length=16,
        position_embedding_type="rope",
        rotary_base=1000000,
        normalization="RMSNorm",
        norm_epsilon=1e-6,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        vocab_size=96,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
}


class UnpaddedReference(GPTModel):
    """Megatron-Core's GPTModel with torch's CE over the first `vocab` columns (all-gathered
    over TP; the gather's backward hands each rank its shard of the gradient)."""

    def __init__(self, *args, vocab: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab = vocab

    def compute_language_model_loss(self, labels, logits):
        full = gather_from_tensor_model_parallel_region(logits)[..., : self.vocab].float()
        s, b, v = full.shape
        target = labels.transpose(0, 1).reshape(-1)  # [b, s] -> [s * b]
        ce = F.cross_entropy(full.reshape(s * b, v), target, reduction="none")
        return ce.view(s, b).transpose(0, 1)  # [s, b] -> [b, s]


def _models(model_cfg: ModelConfig, weighting: TokenWeighting):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = transformer_config(model_cfg, PrecisionConfig(), tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    ours = build_gpt_model(
        model_cfg, tcfg, loss_weighting=weighting, pre_process=True, post_process=True
    )
    theirs = UnpaddedReference(**gpt_model_kwargs(model_cfg, tcfg), vocab=model_cfg.vocab_size)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _batch(model_cfg: ModelConfig):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length + 1), generator=g)
    pos = torch.arange(model_cfg.seq_length).expand(2, -1)
    return tokens[:, :-1], pos, tokens[:, 1:]


def _families_worker(rank, world_size):
    install_cpu_bridge()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    for family in FAMILIES:
        check_family(family)


def check_family(family):
    model_cfg = FAMILIES[family]
    tokens, pos, labels = _batch(model_cfg)

    # "sft": Megatron-Core's GPTModel with CE over the unpadded vocabulary, loss and gradients.
    ours, theirs = _models(model_cfg, TokenWeighting("sft"))
    grad_out = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2))
    loss_ours = ours(tokens, pos, None, labels=labels)
    loss_theirs = theirs(tokens, pos, None, labels=labels)
    assert loss_ours.shape == labels.shape  # [b, s]
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-6)
    loss_ours.backward(grad_out)
    loss_theirs.backward(grad_out)
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(
            p.grad, named[name].grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
    stats = ours.last_loss_stats
    torch.testing.assert_close(stats.cross_entropy, loss_theirs.detach(), rtol=1e-6, atol=1e-6)

    # Megatron-Core's own CE over the padded vocabulary is not that reference.
    padded_ce = GPTModel.compute_language_model_loss(
        theirs, labels, theirs(tokens, pos, None).transpose(0, 1).contiguous()
    )
    assert (padded_ce - loss_theirs).abs().max() > 1e-3

    # Logits: Megatron-Core's in the real columns, finfo.min in the padded ones.
    with torch.no_grad():
        logits_ours, logits_theirs = ours(tokens, pos, None), theirs(tokens, pos, None)
    v_local = logits_ours.shape[-1]
    real = model_cfg.vocab_size - parallel_state.get_tensor_model_parallel_rank() * v_local
    real = min(max(real, 0), v_local)
    torch.testing.assert_close(logits_ours[..., :real], logits_theirs[..., :real], rtol=0, atol=0)
    assert (logits_ours[..., real:] == torch.finfo(torch.float32).min).all()

    # "dft": the same CE weighted by sg(p) = exp(-CE), per token.
    ours, theirs = _models(model_cfg, TokenWeighting("dft"))
    loss_dft = ours(tokens, pos, None, labels=labels)
    ce = theirs(tokens, pos, None, labels=labels).detach()
    torch.testing.assert_close(loss_dft, torch.exp(-ce) * ce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tp", [1, 2])
def test_families(tp):
    pool(tp).run(_families_worker)
