"""The quickstart summary: first and last logged losses per stage, validation, files."""

from __future__ import annotations

import json

from dft_megatron.utils.summary import summary


def test_summary_reads_the_stages(tmp_path):
    for stage, losses in (("pretrain", (4.0, 1.0)), ("dft", (0.05, 0.02))):
        (tmp_path / stage).mkdir()
        recs = [
            {"iteration": i + 1, "loss": v, "ce_loss": 2 * v, "target_prob_mean": 0.1 * (i + 1)}
            for i, v in enumerate(losses)
        ]
        if stage == "dft":
            recs.append(
                {
                    "iteration": 2,
                    "split": "valid",
                    "loss": 0.03,
                    "ce_loss": 1.5,
                    "target_prob_mean": 0.6,
                }
            )
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = summary(tmp_path)
    assert "pre-training (text, SFT loss): iterations 1..2: loss 4.0000 -> 1.0000" in text
    assert "DFT fine-tuning: iterations 1..2: loss 0.0500 -> 0.0200, CE 0.100 -> 0.040" in text
    assert "validation at iteration 2: loss 0.0300, CE 1.500, p 0.600" in text
    assert "evaluation (percent)" not in text  # no results.json yet
