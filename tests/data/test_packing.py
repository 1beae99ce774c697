"""Packing: best-fit decreasing, the packed sequence layout, and attention that never crosses
samples.

Reference for the model check: each sample run alone (unpadded, positions 0..n-1, plain
causal attention). The packed batch (block-diagonal mask and per-sample RoPE positions on
the local spec) must give the same per-token loss (fp32, 1e-5) and the same parameter
gradients (1e-5 relative), for learned absolute positions and for RoPE (GQA, Llama-3.2
scaling), at TP 1 and TP 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dft_megatron.data.packing import assemble, block_causal_mask, pack, packed_seq_params
from tests.dist import pool


def test_pack_fits_every_sample_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=2000)
    bins = pack(lengths, 2048)
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(2000))
    assert all(lengths[b].sum() <= 2048 for b in bins)
    efficiency = lengths.sum() / (len(bins) * 2048)
    assert efficiency > 0.98, efficiency
    assert [b.tolist() for b in pack(lengths, 2048)] == [b.tolist() for b in bins]
    with pytest.raises(ValueError, match="a sample of 9 positions exceeds 8"):
        pack(np.array([3, 9]), 8)


def test_assemble_layout():
    seq = assemble([([1, 2, 3, 4], [0, 0, 1, 1], 2.0), ([5, 6, 7], [0, 1, 1], 1.0)], 8, 0)
    assert seq["tokens"].tolist() == [1, 2, 3, 5, 6, 0, 0, 0]
    assert seq["labels"].tolist() == [2, 3, 4, 6, 7, 0, 0, 0]
    assert seq["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert seq["loss_weight"].tolist() == [2, 2, 2, 1, 1, 0, 0, 0]
    assert seq["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert seq["segment_ids"].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]


def test_masks_and_cu_seqlens():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    mask = block_causal_mask(seg)[0, 0]
    allowed = ~mask
    assert allowed[2].tolist() == [True, True, True, False, False, False]
    assert allowed[4].tolist() == [False, False, False, True, True, False]
    assert allowed[5].tolist() == [False] * 5 + [True]
    params = packed_seq_params(seg)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6] and params.max_seqlen_q == 3
    with pytest.raises(ValueError, match="--micro-batch-size 1"):
        packed_seq_params(seg.expand(2, -1))


def _packed_vs_alone(family):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dft_megatron.loss import TokenWeighting
    from dft_megatron.models import PrecisionConfig, build_gpt_model, transformer_config
    from tests.models.test_gpt import FAMILIES

    cfg = FAMILIES[family]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = transformer_config(cfg, PrecisionConfig(), tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(
        cfg, tcfg, loss_weighting=TokenWeighting("sft"), pre_process=True, post_process=True
    )
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 5, 3)]
    s = cfg.seq_length  # 16: 6 + 4 + 2 positions and 4 of padding
    seq = assemble([(d, [0] + [1] * (len(d) - 1), 1.0) for d in docs], s, 0)
    one = {k: v.unsqueeze(0) for k, v in seq.items()}
    packed = model(
        one["tokens"],
        one["position_ids"],
        block_causal_mask(one["segment_ids"]),
        labels=one["labels"],
    )[0]
    packed[one["segment_ids"][0] >= 0].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = []
    for d in docs:
        t = torch.tensor(d).unsqueeze(0)
        out = model(t[:, :-1], torch.arange(len(d) - 1).unsqueeze(0), None, labels=t[:, 1:])
        out.sum().backward()
        alone.append(out[0].detach())
    torch.testing.assert_close(packed[: 6 + 4 + 2].detach(), torch.cat(alone), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def _worker(rank, world_size):
    from megatron.core import parallel_state

    from dft_megatron.compat import install_cpu_bridge

    install_cpu_bridge()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    for family in ("gpt", "llama3.2"):
        _packed_vs_alone(family)


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_batch_equals_samples_one_by_one(tp):
    pool(tp).run(_worker)
