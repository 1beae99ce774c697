"""The DFT loss: a vocab-parallel cross-entropy weighted per token by sg(p).

Three entries, one result: `vocab_parallel_dft_cross_entropy` (Megatron-Core's CE steps),
`fused_vocab_parallel_dft_cross_entropy` (compiled kernels; `--cross-entropy-loss-fusion`) and
`chunked_output_layer_dft_cross_entropy` (the output projection and the fused loss over chunks
of tokens: the logits never exist whole; `--dft-chunked-output-layer`). Each computes every
objective of the DFT family (`TokenWeighting`: sft, dft, asft, chord, eaft, prob-power; see
weights.py), with per-token-id weights (token_weights.py).
"""

from dft_megatron.loss.cross_entropy import (
    DFTLossStats,
    fused_vocab_parallel_dft_cross_entropy,
    vocab_parallel_dft_cross_entropy,
)
from dft_megatron.loss.output_layer import chunked_output_layer_dft_cross_entropy
from dft_megatron.loss.weights import LOSS_TYPES, SftMixSchedule, TokenWeighting

__all__ = [
    "LOSS_TYPES",
    "DFTLossStats",
    "SftMixSchedule",
    "TokenWeighting",
    "chunked_output_layer_dft_cross_entropy",
    "fused_vocab_parallel_dft_cross_entropy",
    "vocab_parallel_dft_cross_entropy",
]
