"""The SFT files' fingerprint a checkpoint records: content, not times."""

from __future__ import annotations

import os

from dft_megatron.data.fingerprint import data_changes, data_fingerprint


def test_changes_are_named_and_a_touch_is_not_one(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 2}\n')
    saved = data_fingerprint([str(a), str(b)])
    os.utime(a, (1, 1))  # copied or touched: the same bytes
    assert data_changes(saved, data_fingerprint([str(a), str(b)])) == []
    b.write_text('{"x": 3}\n')  # same size, other bytes
    (change,) = data_changes(saved, data_fingerprint([str(a), str(b)]))
    assert str(b.resolve()) in change and "changed since the save" in change
    assert "was read by the checkpointed run" in data_changes(saved, data_fingerprint([str(a)]))[0]
    assert data_changes(None, saved) == []  # a checkpoint that recorded nothing
