"""The DFT loss: a vocab-parallel cross-entropy weighted per token by sg(p)."""

from dft_megatron.loss.cross_entropy import DFTLossStats, vocab_parallel_dft_cross_entropy
from dft_megatron.loss.weights import LOSS_TYPES, TokenWeighting

__all__ = ["LOSS_TYPES", "DFTLossStats", "TokenWeighting", "vocab_parallel_dft_cross_entropy"]
