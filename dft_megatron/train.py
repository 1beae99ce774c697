"""`torchrun ... -m dft_megatron.train [Megatron-LM style flags]`: DFT/SFT training.

See `python -m dft_megatron.train --help` for the flags and README.md for recipes.
"""

from __future__ import annotations

import sys

from dft_megatron.data.sources import DataError
from dft_megatron.training.arguments import parse_args
from dft_megatron.training.trainer import ConfigError, train
from dft_megatron.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    setup_logging()
    cfg, given = parse_args(argv)
    try:
        train(cfg, given)
    except (ConfigError, DataError, FileNotFoundError) as e:
        # The same message on every rank: print it once.
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    if dist.is_initialized():  # a clean end (NCCL warns about a group left open)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
