"""Training data: SFT rows (chat, prompt/response, pre-tokenized, text) tokenized, prompt
masked and packed; synthetic tokens; batches of token ids, labels and loss masks."""

from dft_megatron.data.batches import Batch, EpochShuffled, collate, from_stacked
from dft_megatron.data.config import DataConfig
from dft_megatron.data.mock import MockDataset
from dft_megatron.data.sft import SFTDataset, SFTDataStats, build_sft_datasets, load_tokenizer
from dft_megatron.data.sources import DataError

__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "EpochShuffled",
    "MockDataset",
    "SFTDataStats",
    "SFTDataset",
    "build_sft_datasets",
    "collate",
    "from_stacked",
    "load_tokenizer",
]
