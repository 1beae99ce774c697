"""dft_megatron: Dynamic Fine-Tuning (DFT) at Megatron scale.

Subpackages: `loss` (the vocab-parallel DFT cross-entropy), `compat` (what lets
Megatron-Core run on CPU over gloo), `eval` (math evaluation with the paper's protocol).
"""

__version__ = "0.1.0"
