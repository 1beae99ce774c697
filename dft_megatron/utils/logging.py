"""Console logging for entry points: rank 0 logs INFO to stdout, other ranks warnings only."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process (call from an entry point, not a library)."""
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    # Megatron-Core logs every parameter and config at INFO; keep its warnings.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Megatron-Core warns at import that TE/apex are absent; on CPU that is the expected state
    # and dft_megatron says itself which layers it builds.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
