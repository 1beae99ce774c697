"""Training data: batches of token ids, labels and loss masks for the trainer."""

from dft_megatron.data.batches import Batch, GlobalBatchSampler
from dft_megatron.data.mock import MockDataset

__all__ = ["Batch", "GlobalBatchSampler", "MockDataset"]
