"""SFT data preparation end to end: files of every kind -> counted outcomes -> packed
sequences; and every bad-input case the trainer must report."""

from __future__ import annotations

import json

import pytest

from dft_megatron.data import DataConfig, DataError, build_sft_datasets
from dft_megatron.data.sft import prepare_sft_rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n, long_every=0):
    rows = []
    for i in range(n):
        sol = f"{i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}."
        if long_every and i % long_every == 0:
            sol = " ".join([sol] * 12)
        rows.append({"problem": f"What is {i} + 3?", "solution": sol, "score": i % 3})
    return rows


def _cfg(tmp_path, files, **kw):
    return DataConfig(
        sft_data=[str(f) for f in files],
        prompt_key="problem",
        response_key="solution",
        data_cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def test_formats_read_alike(tmp_path, tokenizer):
    """JSON Lines, a JSON array, Parquet and a save_to_disk folder give the same samples."""
    import datasets

    rows = _rows(12)
    jl = _jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "a.json"
    js.write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    got = []
    for f in (jl, js, tmp_path / "a.parquet", tmp_path / "saved"):
        samples, stats = prepare_sft_rows([str(f)], _cfg(tmp_path, [f]), tokenizer, 256)
        assert stats.outcomes["ok"] == 12
        got.append(samples["input_ids"])
    assert all(g == got[0] for g in got)


def test_outcomes_are_counted_and_located(tmp_path, tokenizer):
    rows = _rows(20, long_every=5)
    rows.append({"problem": "Empty?", "solution": "   ", "score": 0})
    f = _jsonl(tmp_path / "d.jsonl", rows)
    for truncation, key in (("right", "truncated"), ("drop", "dropped_too_long")):
        samples, stats = prepare_sft_rows(
            [str(f)], _cfg(tmp_path, [f], truncation=truncation), tokenizer, 128
        )
        assert stats.rows == 21
        assert stats.outcomes[key] == 4  # rows 0, 5, 10, 15
        assert stats.outcomes["dropped_empty"] == 1
        assert stats.outcome_locations["dropped_empty"] == [f"{f}:21"]
        assert stats.outcome_locations[key][0] == f"{f}:1"
        assert len(samples) == (20 if truncation == "right" else 16)
        assert max(len(ids) for ids in samples["input_ids"]) <= 129
        assert any(key in line for line in stats.lines())


def test_malformed_json(tmp_path, tokenizer):
    lines = [json.dumps(r) for r in _rows(6)]
    lines[2] = '{"problem": "x", "solution": '
    lines[4] = "[1, 2]"
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{f}:3: not a valid JSON object .*--skip-bad-rows"):
        prepare_sft_rows([str(f)], _cfg(tmp_path, [f]), tokenizer, 256)
    samples, stats = prepare_sft_rows(
        [str(f)], _cfg(tmp_path, [f], skip_bad_rows=True), tokenizer, 256
    )
    assert (stats.rows, stats.bad_rows, len(samples)) == (6, 2, 4)
    assert [loc.split(": ")[0] for loc in stats.bad_row_locations] == [f"{f}:3", f"{f}:5"]
    assert any("malformed rows: first at" in line for line in stats.lines())


def test_missing_key_names_key_file_and_keys(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "k.jsonl", [{"problem": "a", "answer": "b"}])
    with pytest.raises(DataError, match=rf"{f}:1: no key 'solution' .*\['answer', 'problem'\]"):
        prepare_sft_rows(
            [str(f)], _cfg(tmp_path, [f], data_format="prompt_response"), tokenizer, 64
        )


def test_nothing_left_is_an_error(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "e.jsonl", [{"problem": "a", "solution": " "}] * 3)
    with pytest.raises(DataError, match="no sample left after filtering.*dropped_empty 3"):
        prepare_sft_rows([str(f)], _cfg(tmp_path, [f]), tokenizer, 64)


def test_bad_paths(tmp_path, tokenizer):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: unknown data file type '.csv'"):
        prepare_sft_rows([str(tmp_path / "x.csv")], _cfg(tmp_path, []), tokenizer, 64)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        prepare_sft_rows([str(tmp_path / "nope.jsonl")], _cfg(tmp_path, []), tokenizer, 64)


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "c.jsonl", _rows(8))
    cfg = _cfg(tmp_path, [f])
    prepare_sft_rows([str(f)], cfg, tokenizer, 128)
    entries = sorted((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not any("incomplete" in e.name for e in entries)
    prepare_sft_rows([str(f)], cfg, tokenizer, 128)
    assert sorted((tmp_path / "cache").iterdir()) == entries
    _jsonl(f, _rows(9))  # the file changed: tokenized again
    samples, _ = prepare_sft_rows([str(f)], cfg, tokenizer, 128)
    assert len(samples) == 9 and len(list((tmp_path / "cache").iterdir())) == 2


def test_packed_sequences_and_weights(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "p.jsonl", _rows(40))
    cfg = _cfg(tmp_path, [f], sample_weight_key="score", valid_fraction=0.25)
    train, valid, stats = build_sft_datasets(cfg, tokenizer, 256, seed=3)
    assert (len(train.samples), len(valid.samples)) == (30, 10)
    assert stats.sequences == len(train) < 30  # several samples per sequence
    seen = 0
    for i in range(len(train)):
        seq = train[i]
        seg = seq["segment_ids"]
        n_docs = int(seg.max()) + 1
        seen += n_docs
        assert seq["tokens"].shape == (256,)
        for k in range(n_docs):
            at = (seg == k).nonzero().flatten()
            assert (at == torch_arange(at[0], at[-1] + 1)).all()  # contiguous
            assert (seq["position_ids"][at] == torch_arange(0, len(at))).all()
            # the label of a sample's last position is its own last token, not the next one's
            w = seq["loss_weight"][at]
            assert (w == w[0]).all()
        assert (seq["loss_mask"][seg < 0] == 0).all()
    assert seen == 30
    unpacked, _, _ = build_sft_datasets(
        _cfg(tmp_path, [f], packing=False, valid_fraction=0.25), tokenizer, 256, seed=3
    )
    assert len(unpacked) == 30 and train.packing_efficiency > unpacked.packing_efficiency


def torch_arange(a, b):
    import torch

    return torch.arange(int(a), int(b))


def test_eval_only_uses_sft_data_as_validation(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "v.jsonl", _rows(5))
    train, valid, _ = build_sft_datasets(_cfg(tmp_path, [f]), tokenizer, 128, 0, eval_only=True)
    assert train is None and len(valid.samples) == 5


def test_worker_processes_give_the_same_samples(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "w.jsonl", _rows(600))
    one, _ = prepare_sft_rows([str(f)], _cfg(tmp_path / "1", [f]), tokenizer, 256)
    two, stats = prepare_sft_rows(
        [str(f)], _cfg(tmp_path / "2", [f], num_workers=2), tokenizer, 256
    )
    assert stats.outcomes["ok"] == 600
    assert one["input_ids"] == two["input_ids"] and one["target_mask"] == two["target_mask"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "-Infinity"])
def test_non_finite_sample_weight_names_the_row(tmp_path, tokenizer, bad):
    """A NaN or infinite weight would turn the whole batch's loss (and every weight after the
    step) non-finite: refused at preparation with the row's file:line, before any training."""
    rows = [{"problem": f"{i} + 1?", "solution": f"{i + 1}", "score": 1.0} for i in range(5)]
    rows[2]["score"] = bad
    f = tmp_path / "w.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN / Infinity as JSON allows
    cfg = _cfg(tmp_path, [f], sample_weight_key="score")
    with pytest.raises(DataError, match=rf"{f}:3: 'score' = .* is not (finite|a number)"):
        prepare_sft_rows([str(f)], cfg, tokenizer, 128)
