"""`torchrun ... -m dft_megatron.train [Megatron-LM flags] --loss-type dft`: DFT on
Megatron-LM's trainer. See dft_megatron/training/entry.py and README.md."""

from __future__ import annotations

import sys

from dft_megatron.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
