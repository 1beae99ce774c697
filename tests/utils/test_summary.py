"""The quickstart summary: first and last logged losses and p regimes per stage (the
--log-metrics-jsonl records of dft_megatron/training/metrics.py), validation, files."""

from __future__ import annotations

import json

from dft_megatron.utils.summary import summary


def test_summary_reads_the_stages(tmp_path):
    for stage, losses in (("pretrain", (4.0, 1.0)), ("dft", (0.05, 0.02))):
        (tmp_path / stage).mkdir()
        recs = [
            {
                "iteration": 10 * (i + 1),
                "loss": v,
                "ce_loss": 2 * v,
                "target_prob_mean": 0.1 * (i + 1),
                "p<0.01": 0.5 - 0.1 * i,
                "p>0.99": 0.1 * i,
            }
            for i, v in enumerate(losses)
        ]
        if stage == "dft":
            recs.append(
                {
                    "iteration": 20,
                    "split": "valid",
                    "full_pass": False,
                    "loss": 0.03,
                    "ce_loss": 1.5,
                    "target_prob_mean": 0.6,
                }
            )
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = summary(tmp_path)
    assert "pre-training (text, SFT loss): iterations 10..20: loss 4.0000 -> 1.0000" in text
    assert "DFT fine-tuning: iterations 10..20: loss 0.0500 -> 0.0200, CE 0.100 -> 0.040" in text
    assert "target tokens with p < 0.01: 50.0% -> 40.0%, p > 0.99: 0.0% -> 10.0%" in text
    assert "validation at iteration 20: loss 0.0300, CE 1.500, p 0.600" in text
    assert "no metrics" not in text
    assert "evaluation (percent)" not in text  # no results.json yet


def test_summary_without_metrics(tmp_path):
    text = summary(tmp_path)
    assert f"DFT fine-tuning: no metrics in {tmp_path / 'dft'}" in text
