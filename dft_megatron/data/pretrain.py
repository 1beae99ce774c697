"""Pre-training data: Megatron-Core's GPTDataset over indexed datasets, blended and split.

`build_pretrain_datasets` takes Megatron-LM's `--data-path` (plain prefixes, or
"w1 prefix1 w2 prefix2 ...") and `--split` ("969,30,1": train, valid, test fractions of the
documents of every prefix) and builds the train and valid datasets with
`BlendedMegatronDatasetBuilder` and `GPTDataset`: documents are shuffled by `seed`,
concatenated and cut into `seq_length + 1`-token samples that cross document boundaries
(as in Megatron-LM, with attention across the EOD token; `eod_mask_loss` drops the loss
where the input token is EOD, i.e. on predicting the next document's first token), and a
blend draws from each prefix in proportion to its weight.

Each sample comes back in the trainer's format (dft_megatron/data/mock.py, batches.py):
`{"tokens": LongTensor[seq_length + 1], "loss_mask": FloatTensor[seq_length]}`.

Determinism and ranks: the sample order depends only on (data, split, seq_length, seed,
num_samples), never on the parallel layout, so every DP size sees the same global batches
(Megatron-LM's sampler slices them). Every rank reads its own samples, so the datasets are built
on every rank (`is_built_on_rank` is always true): Megatron-Core builds the index (.npy
files under `path_to_cache`, by default `{prefix}/cache/GPTDataset_indices` next to the
data) on global rank 0 first, then the other ranks load it after a barrier. The cache
directory must therefore be visible to all ranks; `build_pretrain_datasets` checks that
before building and names the ranks (and hosts) that cannot see it.

Megatron-Core's index helpers are C++ (`megatron/core/datasets/helpers_cpp`), compiled into
the megatron-core wheel: nothing is compiled at run time.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from megatron.core.tokenizers import MegatronTokenizerBase

from dft_megatron.data.indexed import document_end_id

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "969, 30, 1"
"""Megatron-LM's default --split."""


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """What GPTDataset reads from a tokenizer, taken from a Hugging Face tokenizer.

    GPTDatasetConfig needs `vocab_size` (the token dtype), `eod` (the document end:
    the EOS token, as Megatron-LM's HuggingFaceTokenizer), `pad` (padding of a short last
    validation sample, masked out of the loss) and `unique_identifiers` (part of the index
    cache key; the tokenizer's path is left out so that a moved tokenizer folder still hits
    the cache).
    """

    def __init__(self, hf_tokenizer):
        super().__init__(getattr(hf_tokenizer, "name_or_path", ""), {})
        self.hf_tokenizer = hf_tokenizer
        self._eod = document_end_id(hf_tokenizer)
        self._pad = hf_tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def vocab(self) -> dict[str, int]:
        return self.hf_tokenizer.get_vocab()

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        # No pad token: Megatron-Core's own fallback id (-1), which never occurs in data.
        return -1 if self._pad is None else self._pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [
                ("class", type(self).__qualname__),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    def tokenize(self, text: str) -> list[int]:
        return self.hf_tokenizer(text)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.hf_tokenizer.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        return self.hf_tokenizer.apply_chat_template(*args, **kwargs)


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's --data-path: ["p1", "p2"] or ["w1", "p1", "w2", "p2"] -> (prefixes, weights).

    Every prefix must name an indexed dataset (`prefix.bin` and `prefix.idx`).
    """
    from megatron.core.datasets.utils import get_blend_from_list

    if not data_path:
        raise ValueError("--data-path is empty: give one or more indexed dataset prefixes")
    # One string with spaces (from a YAML file or a quoted shell variable) is a list too.
    data_path = [part for item in data_path for part in str(item).split()]
    prefixes, weights = get_blend_from_list(data_path)
    for prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if missing:
            raise FileNotFoundError(
                f"--data-path {prefix}: {' and '.join(prefix + s for s in missing)} not found; "
                "a prefix names the .bin/.idx pair that tools/preprocess_data.py writes "
                "(e.g. out/corpus_text_document), and weights come before their prefix"
            )
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"--data-path weights must be positive, got {weights}")
    return prefixes, weights


class PretrainSamples:
    """A Megatron GPT/Blended dataset as {"tokens": [s + 1] int64, "loss_mask": [s] float}.

    `size` exposes only the first `size` samples (Megatron builds whole epochs, so a split
    asked for N samples may hold more); None exposes all of them.
    """

    def __init__(self, dataset, size: int | None = None):
        self.dataset = dataset
        self.size = len(dataset) if size is None else min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"pre-training sample {index} out of range [0, {self.size})")
        sample = self.dataset[index]
        # GPTDataset: tokens = text[:-1], labels = text[1:]  ->  text = tokens + labels[-1:].
        tokens = torch.cat([sample["tokens"], sample["labels"][-1:]])
        return {"tokens": tokens, "loss_mask": sample["loss_mask"].float()}


def _check_splits_have_documents(prefixes: list[str], split_matrix: list, split: str) -> None:
    """Every split that is built gets at least one document of every prefix.

    (GPTDataset asked for samples from a split without tokens loops forever looking for an
    epoch that holds them.) The book-ends are BlendedMegatronDatasetBuilder's.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    for prefix in prefixes:
        n = len(IndexedDataset(prefix).sequence_lengths)
        for part in Split:
            bookends = split_matrix[part.value]
            if bookends is None:
                continue
            count = int(round(bookends[1] * n)) - int(round(bookends[0] * n))
            if count < 1:
                raise ValueError(
                    f"--split {split!r} gives the {part.name} split no document of the {n} in "
                    f"{prefix}; add documents or give that split a larger share"
                )


def _cache_dirs(prefixes: list[str], path_to_cache: str | None) -> list[str]:
    if path_to_cache is not None:
        return [path_to_cache]
    # GPTDataset's default; BlendedDataset indices are then not cached (rebuilt per rank,
    # deterministically).
    return [os.path.join(p, "cache", "GPTDataset_indices") for p in prefixes]


def check_cache_visible_to_all_ranks(directories: list[str]) -> None:
    """Raise on every rank unless each directory that rank 0 writes is visible to all ranks.

    Megatron-Core builds the index on global rank 0 and the other ranks read it from disk,
    so a directory on a node-local disk fails on the other nodes. Collectives: one barrier
    and one all_gather_object over the world.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    rank = torch.distributed.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    name = f".visible-{token[0]}"
    if rank == 0:
        for directory in directories:
            os.makedirs(directory, exist_ok=True)
            Path(directory, name).write_text(token[0])
    torch.distributed.barrier()
    unseen = [d for d in directories if not os.path.isfile(os.path.join(d, name))]
    report = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(report, (rank, socket.gethostname(), unseen))
    if rank == 0:
        for directory in directories:
            os.remove(os.path.join(directory, name))
    blind = [r for r in report if r[2]]
    if blind:
        rank_list = ", ".join(f"rank {r} on {host}" for r, host, _ in blind[:8])
        raise RuntimeError(
            f"the dataset index cache {blind[0][2][0]} written by rank 0 is not visible to "
            f"{len(blind)} ranks ({rank_list}): put --data-cache-path (or the data) on a "
            "filesystem that all nodes share"
        )


def build_pretrain_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int | None],
    tokenizer,
    path_to_cache: str | None = None,
    eod_mask_loss: bool = False,
    num_dataset_builder_threads: int = 1,
) -> tuple[PretrainSamples, PretrainSamples | None]:
    """(train, valid) pre-training datasets in the trainer's sample format.

    Args:
        data_path: Megatron-LM's --data-path as a list of words (see `parse_data_path`).
        split: Megatron-LM's --split, e.g. "969,30,1" (train, valid, test document fractions).
        seq_length: tokens per sample fed to the model; samples hold seq_length + 1.
        seed: shuffles documents and samples (Megatron-LM's --seed).
        num_samples: (train samples, valid samples). Train: at least this many are built
            (whole epochs; the trainer consumes train_iters * global_batch_size). Valid:
            exactly this many are exposed, or None for one full pass over the valid split.
        tokenizer: a Hugging Face tokenizer (or a `MegatronTokenizerAdapter`): EOD and pad ids.
        path_to_cache: where the index .npy files go (--data-cache-path); None: next to the data.
        eod_mask_loss: Megatron-LM's --eod-mask-loss: no loss where the input token is EOD
            (the target there is the first token of the next document).
        num_dataset_builder_threads: prefixes indexed in parallel on rank 0.

    Returns the valid dataset as None when the split gives validation no documents.
    Collective when torch.distributed is initialized: call on every rank.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    prefixes, weights = parse_data_path(data_path)
    train_samples, valid_samples = num_samples
    if train_samples < 1:
        raise ValueError(f"train samples must be >= 1, got {train_samples}")
    if not isinstance(tokenizer, MegatronTokenizerAdapter):
        tokenizer = MegatronTokenizerAdapter(tokenizer)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        # The trainer builds causal masks and positions itself (dft_megatron/data/batches.py).
        create_attention_mask=False,
        num_dataset_builder_threads=num_dataset_builder_threads,
    )
    # The test split's documents stay out of train and valid (the book-ends of the split
    # matrix are unchanged), but nothing reads test samples, so they are not built: a tiny
    # test split (1 of "969,30,1") can hold no sample at all, which Megatron's blend rejects.
    config.split_matrix[Split.test.value] = None
    has_valid = config.split_matrix[Split.valid.value] is not None
    if weights is not None and has_valid and valid_samples is None:
        raise ValueError(
            "a weighted --data-path blend needs a validation sample count (e.g. eval_iters x "
            "global batch size); give one, or list prefixes without weights"
        )
    _check_splits_have_documents(prefixes, config.split_matrix, split)
    check_cache_visible_to_all_ranks(_cache_dirs(prefixes, path_to_cache))
    # Megatron wants a size for every split of a weighted blend, built or not.
    sizes = [train_samples, valid_samples if has_valid else 0, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ValueError(
            f"--split {split!r} leaves no training samples of {seq_length + 1} tokens in "
            f"--data-path {' '.join(data_path)}"
        )
    train = PretrainSamples(train)
    if valid is not None and len(valid) > 0:
        if valid_samples is not None and len(valid) < valid_samples:
            raise ValueError(
                f"the valid split holds {len(valid)} samples, fewer than the {valid_samples} asked"
            )
        valid = PretrainSamples(valid, valid_samples)
    else:
        valid = None
    logger.info(
        "pre-training data: %d train samples%s of %d tokens from %d prefix(es), split %s",
        len(train),
        "" if valid is None else f", {len(valid)} valid samples",
        seq_length + 1,
        len(prefixes),
        split,
    )
    return train, valid
