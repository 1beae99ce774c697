"""Pre-training data: JSONL -> indexed dataset -> GPTDataset samples in the trainer's format.

References: the Hugging Face tokenizer's own `tokenizer(text)["input_ids"]` (what the .bin
must hold), the documents themselves (what samples are cut from), and the weights of a blend
(sample counts per prefix).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from dft_megatron.data.indexed import JsonlFormatError, indexed_prefix, preprocess_jsonl
from dft_megatron.data.math_problems import generate_splits
from dft_megatron.data.pretrain import (
    build_pretrain_datasets,
    check_cache_visible_to_all_ranks,
)
from tests.dist import spawn

TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "math" / "tokenizer"
SEQ = 32


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two corpora of generated math text, preprocessed with an EOD after each document."""
    root = tmp_path_factory.mktemp("pretrain")
    train, test = generate_splits(train_size=240, test_size=80, seed=3)
    out = {}
    for name, rows in (("a", train), ("b", test)):
        texts = [f"{r['problem']}\n{r['solution']}" for r in rows]
        path = write_jsonl(root / f"{name}.jsonl", [json.dumps({"text": t}) for t in texts])
        preprocess_jsonl(path, TOKENIZER, str(root / name), append_eod=True)
        out[name] = (indexed_prefix(str(root / name), "text"), texts)
    out["root"] = root
    return out


def test_indexed_dataset_holds_the_tokenizers_ids(corpus, tokenizer):
    prefix, texts = corpus["a"]
    data = IndexedDataset(prefix)
    assert len(data) == len(texts) and data.index.dtype.__name__ == "uint16"
    eod = tokenizer.eos_token_id
    for i, text in enumerate(texts):
        assert data[i].tolist() == tokenizer(text)["input_ids"] + [eod]


def test_workers_and_cli_write_the_same_bytes(corpus, tmp_path):
    from tools.preprocess_data import main

    prefix, _ = corpus["a"]
    out = tmp_path / "cli"
    summary = main(
        ["--input", str(corpus["root"] / "a.jsonl"), "--tokenizer-model", str(TOKENIZER),
         "--output-prefix", str(out), "--append-eod", "--workers", "2", "--log-interval", "100"]
    )  # fmt: skip
    assert summary["documents"] == {"text": 240}
    for suffix in (".bin", ".idx"):
        assert (
            Path(f"{out}_text_document{suffix}").read_bytes() == Path(prefix + suffix).read_bytes()
        )


def test_bad_rows(tmp_path, tokenizer):
    good = json.dumps({"text": "1 + 1 = 2", "id": 1})
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [good, "", '{"text": "unterminated', "[1, 2]", json.dumps({"text": ""}), good],
    )
    out = str(tmp_path / "out")
    with pytest.raises(JsonlFormatError, match=rf"{path}:3: malformed JSON.*--skip-bad-rows"):
        preprocess_jsonl(path, TOKENIZER, out)
    assert not os.path.exists(indexed_prefix(out, "text") + ".bin")  # partial output removed

    summary = preprocess_jsonl(path, TOKENIZER, out, skip_bad_rows=True, append_eod=True)
    assert summary.bad_rows == 2 and summary.blank_lines == 1
    assert summary.empty_documents == {"text": 1} and summary.documents == {"text": 2}
    assert summary.bad_row_locations[0].startswith(f"{path}:3: malformed JSON")
    assert summary.bad_row_locations[1] == f"{path}:4: a JSON list, not an object"
    data = IndexedDataset(indexed_prefix(out, "text"))
    assert [d.tolist() for d in data] == [tokenizer("1 + 1 = 2")["input_ids"] + [2]] * 2

    missing = write_jsonl(tmp_path / "missing.jsonl", [good, json.dumps({"content": "x"})])
    with pytest.raises(
        JsonlFormatError,
        match=r"missing.jsonl:2: the row has no key 'text' \(keys present: \['content'\]\)",
    ):  # noqa: E501
        preprocess_jsonl(missing, TOKENIZER, out, skip_bad_rows=True)
    not_text = write_jsonl(tmp_path / "int.jsonl", [json.dumps({"text": 5})])
    with pytest.raises(JsonlFormatError, match="int.jsonl:1: the row key 'text' holds a int"):
        preprocess_jsonl(not_text, TOKENIZER, out)


def _documents_in(sample: torch.Tensor, eod: int) -> list[list[int]]:
    """The complete documents inside a sample (between two EODs), EOD included."""
    ids = sample.tolist()
    ends = [i for i, t in enumerate(ids) if t == eod]
    return [ids[a + 1 : b + 1] for a, b in zip(ends, ends[1:], strict=False)]


def test_samples_have_the_trainer_format_and_come_from_the_documents(corpus, tokenizer, tmp_path):
    prefix, texts = corpus["a"]
    # Long enough to hold whole documents (about 100 tokens each) between two EODs.
    LONG = 256  # noqa: N806
    eod = tokenizer.eos_token_id
    documents = {tuple(tokenizer(t)["input_ids"] + [eod]) for t in texts}
    train, valid = build_pretrain_datasets(
        [prefix], "90,10,0", LONG, 5, (400, 24), tokenizer, path_to_cache=str(tmp_path)
    )
    assert len(train) >= 400 and len(valid) == 24
    inner = 0
    for i in range(0, len(train), 7):
        sample = train[i]
        assert sample["tokens"].shape == (LONG + 1,) and sample["tokens"].dtype == torch.int64
        assert sample["loss_mask"].shape == (LONG,) and sample["loss_mask"].dtype == torch.float32
        assert torch.all(sample["loss_mask"] == 1)
        for doc in _documents_in(sample["tokens"], eod):
            assert tuple(doc) in documents
            inner += 1
    assert inner > 0  # the check above ran on real documents

    masked, _ = build_pretrain_datasets(
        [prefix], "90,10,0", LONG, 5, (400, 24), tokenizer, path_to_cache=str(tmp_path),
        eod_mask_loss=True,
    )  # fmt: skip
    for i in range(0, len(masked), 11):
        s = masked[i]
        assert torch.equal(s["tokens"], train[i]["tokens"])
        # Megatron-LM's --eod-mask-loss: no loss where the *input* is EOD, i.e. on the first
        # token of the next document, which nothing in the sample predicts.
        assert torch.equal(s["loss_mask"], (s["tokens"][:-1] != eod).float())


def test_deterministic_and_cached(corpus, tokenizer, tmp_path):
    prefix, _ = corpus["a"]

    def first_samples(seed, cache):
        train, _ = build_pretrain_datasets(
            [prefix], "90,10,0", SEQ, seed, (200, 8), tokenizer, path_to_cache=str(cache)
        )
        return torch.stack([train[i]["tokens"] for i in range(50)])

    built = first_samples(1, tmp_path / "c1")
    assert any((tmp_path / "c1").glob("*-GPTDataset-train-shuffle_index.npy"))
    assert torch.equal(first_samples(1, tmp_path / "c1"), built)  # from the cache
    assert torch.equal(first_samples(1, tmp_path / "c2"), built)  # rebuilt elsewhere
    assert not torch.equal(first_samples(2, tmp_path / "c1"), built)


def test_blends_follow_their_weights(corpus, tokenizer, tmp_path):
    a, _ = corpus["a"]
    b, _ = corpus["b"]
    train, valid = build_pretrain_datasets(
        ["30", a, "70", b], "969,30,1", 16, 1, (1000, 40), tokenizer, path_to_cache=str(tmp_path)
    )
    assert len(train) == 1000 and len(valid) == 40
    counts = Counter(int(train.dataset[i]["dataset_id"]) for i in range(len(train)))
    assert counts == {0: 300, 1: 700}
    assert train[999]["tokens"].shape == (17,)

    # Without weights: one epoch of each, blended in proportion to their sizes.
    train, valid = build_pretrain_datasets(
        [f"{a} {b}"], "969,30,1", 16, 1, (100, None), tokenizer, path_to_cache=str(tmp_path)
    )
    sizes = Counter(int(train.dataset[i]["dataset_id"]) for i in range(len(train)))
    assert len(train) == 100 and sizes[0] > sizes[1] > 0


def test_bad_data_path(corpus, tokenizer, tmp_path):
    a, _ = corpus["a"]
    with pytest.raises(FileNotFoundError, match=r"--data-path .*nope: .*nope.bin and .*nope.idx"):
        build_pretrain_datasets([str(tmp_path / "nope")], "1,0,0", SEQ, 1, (10, 0), tokenizer)
    with pytest.raises(ValueError, match="weights must be positive"):
        build_pretrain_datasets(["0", a, "1", a], "1,0,0", SEQ, 1, (10, 0), tokenizer)
    with pytest.raises(ValueError, match="needs a validation sample count"):
        build_pretrain_datasets(["1", a, "1", a], "9,1,0", SEQ, 1, (10, None), tokenizer)


def _ranks_build(rank: int, world_size: int, prefix: str, cache: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    # A relative cache path seen from different working directories: rank 1 cannot see what
    # rank 0 writes, as on two nodes without a shared filesystem.
    os.chdir(Path(out) / f"cwd{rank}")
    with pytest.raises(RuntimeError, match=r"not visible to 1 ranks \(rank 1 on "):
        check_cache_visible_to_all_ranks(["relative_cache"])
    train, valid = build_pretrain_datasets(
        [prefix], "90,10,0", SEQ, 9, (300, 16), tokenizer, path_to_cache=cache
    )
    samples = torch.stack([train[i]["tokens"] for i in range(len(train))])
    torch.save({"train": samples, "valid": valid[15]["tokens"]}, Path(out) / f"rank{rank}.pt")


def test_every_rank_reads_the_same_samples_from_rank0s_cache(corpus, tokenizer, tmp_path):
    prefix, _ = corpus["a"]
    for rank in range(2):
        (tmp_path / f"cwd{rank}").mkdir()
    spawn(_ranks_build, 2, prefix, str(tmp_path / "shared_cache"), str(tmp_path))
    train, valid = build_pretrain_datasets(
        [prefix], "90,10,0", SEQ, 9, (300, 16), tokenizer, path_to_cache=str(tmp_path / "own")
    )
    reference = torch.stack([train[i]["tokens"] for i in range(len(train))])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["train"], reference), rank
        assert torch.equal(got["valid"], valid[15]["tokens"]), rank
    assert not list((tmp_path / "shared_cache").glob(".visible-*"))  # the probe is cleaned up


def test_a_split_without_documents_is_refused(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "few.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(20)]
    )
    preprocess_jsonl(path, TOKENIZER, str(tmp_path / "few"), append_eod=True)
    prefix = indexed_prefix(str(tmp_path / "few"), "text")
    # 20 documents at "98,1,1": the valid split gets round(0.99 * 20) - round(0.98 * 20) = 0.
    with pytest.raises(ValueError, match=r"gives the valid split no document of the 20 in"):
        build_pretrain_datasets([prefix], "98,1,1", 4, 1, (10, 2), tokenizer)
