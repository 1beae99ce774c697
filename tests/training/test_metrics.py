"""MetricSums.add on hand-made per-token tensors, on the CPU and (where present) on CUDA.

Reference: the sums, regime counts and histogram computed by hand for 6 tokens, 4 of them
loss tokens; exact (fp64 sums of a few fp32 values). On CUDA the per-token tensors come from
the GPU, as in a GPU training step, and the sums must come out the same on the CPU (the
trainer all-reduces and logs them from there).
"""

from __future__ import annotations

import pytest
import torch

from dft_megatron.loss import DFTLossStats
from dft_megatron.training.metrics import HIST_BINS, MetricSums

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_metric_sums_add(device):
    p = torch.tensor([[0.005, 0.3, 0.7], [0.995, 0.6, 0.2]], device=device)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], device=device)
    loss = torch.tensor([[1.0, 2.0, 40.0], [3.0, 4.0, 50.0]], device=device)
    stats = DFTLossStats(target_prob=p, entropy=loss / 10, cross_entropy=loss * 2)

    sums = MetricSums()
    sums.add(loss, stats, mask)
    sums.add(loss, None, mask)  # an unlogged micro-batch: loss sum and token count only

    assert sums.values.device.type == "cpu"
    summary = sums.summary()
    assert summary["tokens"] == 8
    assert summary["loss"] == pytest.approx(20.0 / 8)
    # ce, p and entropy came from the first call only (4 tokens) and are divided by all 8.
    assert summary["ce_loss"] == pytest.approx(20.0 / 8)
    assert summary["target_prob_mean"] == pytest.approx((0.005 + 0.3 + 0.995 + 0.6) / 8)
    assert summary["entropy"] == pytest.approx(1.0 / 8)
    # Regimes of the 4 loss tokens: < 0.01, 0.01-0.5 (0.3), 0.5-0.99 (0.6), > 0.99.
    counts = [summary[k] * 8 for k in ("p<0.01", "p 0.01-0.5", "p 0.5-0.99", "p>0.99")]
    assert counts == pytest.approx([1, 1, 1, 1])
    hist = sums.histogram()
    assert len(hist) == HIST_BINS and sum(hist) == 4
    assert [i for i, c in enumerate(hist) if c] == [0, 6, 12, 19]
