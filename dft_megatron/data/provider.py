"""The datasets provider for Megatron-LM's trainer: SFT rows, Megatron indexed data or mock.

`DatasetsProvider(args, data config, tokenizer, vocabulary size)` is what
`pretrain(train_valid_test_dataset_provider=...)` calls with Megatron-LM's sample counts
(train: --train-iters x global batch or --train-samples; valid: evaluations x --eval-iters
x global batch). Every rank builds its datasets (`is_distributed = True`) and reads them
through Megatron-LM's sampler and loader; `prepare()` may be called before `pretrain` (the
SFT data decides --train-epochs' iteration count) and its result is reused.

- SFT (--sft-data): `build_sft_datasets` on global rank 0 first (it fills the tokenized
  cache), then on the other ranks (they read it); the training sequences in a per-epoch
  seeded order (`EpochShuffled`, as many epochs as the sample count needs), validation in
  its own order, cycled as Megatron-LM reads --eval-iters batches at every evaluation, or
  once with --eval-only (`OnePass`: every sample once, the last global batch filled with
  samples that carry no loss).
- Pre-training (--data-path): Megatron-Core's GPTDataset through
  `BlendedMegatronDatasetBuilder` (data/pretrain.py) with --split, --seq-length, --seed,
  --data-cache-path and --eod-mask-loss.
- Mock (--mock-data): synthetic samples, deterministic per global index (data/mock.py).
"""

from __future__ import annotations

import argparse
import logging

import torch.distributed as dist

from dft_megatron.data.batches import EpochShuffled
from dft_megatron.data.config import DataConfig
from dft_megatron.data.mock import MockDataset
from dft_megatron.data.pretrain import build_pretrain_datasets
from dft_megatron.data.sft import build_sft_datasets
from dft_megatron.data.sources import DataError

logger = logging.getLogger(__name__)


class OnePass:
    """Every sample of `dataset` once, then `length - len(dataset)` fillers that carry no loss
    (a copy of sample 0 with a zero loss mask): whole global batches for one evaluation pass."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, max(length, len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            return self.dataset[index]
        filler = dict(self.dataset[0])
        filler["loss_mask"] = filler["loss_mask"] * 0
        return filler


class Cycled:
    """`length` samples of `dataset`, read round and round in its own order."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


def rank0_first(build):
    """Run `build` on global rank 0 (which fills the data cache), then on the other ranks
    (which read it); an error on rank 0 stops every rank with rank 0's message."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return build()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = build()
        except Exception as e:
            error = e
    failure = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise DataError(f"data preparation failed on rank 0: {failure[0]}")
    return result if dist.get_rank() == 0 else build()


class DatasetsProvider:
    """See the module docstring."""

    is_distributed = True  # every rank builds and reads its own datasets

    def __init__(self, args: argparse.Namespace, cfg: DataConfig, tokenizer, vocab_size: int):
        self.args = args
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._sft = None

    def prepare(self):
        """The SFT (train, valid) sequences, built once; None without --sft-data."""
        if self._sft is None and self.cfg.sft_data:
            a = self.args
            train, valid, stats = rank0_first(
                lambda: build_sft_datasets(
                    self.cfg,
                    self.tokenizer,
                    a.seq_length,
                    a.seed,
                    self.vocab_size,
                    eval_only=a.eval_only,
                )
            )
            if dist.get_rank() == 0:
                for line in stats.lines():
                    logger.info("SFT data: %s", line)
            self._sft = (train, valid)
        return self._sft

    def __call__(self, num_samples, vp_stage=None):
        n_train, n_valid, _ = num_samples
        a = self.args
        if self.cfg.mock_data:
            train = MockDataset(self.vocab_size, a.seq_length, a.seed, size=max(n_train, 1))
            valid = MockDataset(
                self.vocab_size, a.seq_length, a.seed + 1, size=max(n_valid or 1, 1)
            )
            return train, valid, None
        if self.cfg.sft_data:
            train, valid = self.prepare()
            if train is not None:
                train = EpochShuffled(train, n_train, a.seed)
            if valid is not None:
                if a.eval_only:
                    valid = OnePass(valid, a.eval_iters * a.global_batch_size)
                else:
                    valid = Cycled(valid, max(n_valid or 0, len(valid)))
            return train, valid, None
        if self.tokenizer is None:
            raise DataError(
                "--data-path needs --tokenizer-model (the tokenizer the data was preprocessed "
                "with: its end-of-document id)"
            )
        wants_valid = bool(a.eval_iters) or a.skip_train  # no --eval-interval: eval_iters 0
        try:
            train, valid = build_pretrain_datasets(
                self.cfg.data_path,
                self.cfg.split,
                a.seq_length,
                a.seed,
                (max(n_train, 1), n_valid if wants_valid else None),
                self.tokenizer,
                path_to_cache=self.cfg.data_cache_dir,
                eod_mask_loss=self.cfg.eod_mask_loss,
            )
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"--data-path: {e}") from None
        if wants_valid and valid is None:
            raise DataError(
                f"--split {self.cfg.split} leaves no validation documents; give validation a "
                "share (e.g. --split 969,30,1) or drop --eval-interval / --eval-only"
            )
        return train, valid, None
