"""tools/inspect_sft_data.py: the marked samples, the statistics and the JSON Lines dump."""

from __future__ import annotations

import json
import runpy
import sys

import pytest


def test_inspect_tool(tmp_path, tokenizer_dir, capsys, monkeypatch):
    rows = [{"problem": f"What is {i} + 1?", "solution": f"It is {i + 1}."} for i in range(6)]
    rows.append({"problem": "Empty", "solution": ""})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dump = tmp_path / "out" / "seqs.jsonl"
    argv = ["inspect_sft_data.py", "--sft-data", str(data), "--tokenizer-model", str(tokenizer_dir)]
    argv += ["--seq-length", "200", "--prompt-key", "problem", "--response-key", "solution"]
    argv += ["--data-cache-path", str(tmp_path / "c"), "--show", "1", "--dump-jsonl", str(dump)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path("tools/inspect_sft_data.py", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "⟦It is 1.<|im_end|>⟧" in out or "⟦It is" in out
    assert "rows 7: ok 6" in out and "dropped_empty 1" in out
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert sum(len(r["documents"]) for r in records) == 6
    targets = 0
    for r in records:
        assert len(r["input_ids"]) == len(r["loss_mask"]) == 200
        inside = {i for a, b in r["documents"] for i in range(a, b)}
        assert all(i in inside for i, m in enumerate(r["loss_mask"]) if m)
        targets += sum(r["loss_mask"])
    assert f"target tokens {targets} " in out
