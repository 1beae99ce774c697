"""Console logging for entry points: rank 0 logs INFO to stdout, other ranks warnings only,
except DFT's progress lines, which come from the last rank (Megatron-LM's logging rank)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Third-party notices that every CPU (or TE-less) start prints and that say nothing about the
# run: dft_megatron says itself which layers it builds and what it bridges.
_QUIET_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "Only transformer-engine>=1.7.0 supports MoE experts",
    "MimoModelConfig is experimental",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"\s*It is recommended to use a ModelConfig",
)
_QUIET_LOG_MESSAGES = (
    "GPTModel IS DEPRECATED",
    "MCore's async save is deprecated",
    "No CUDA runtime is found",
)

PROGRESS_LOGGER = "dft_megatron.training.metrics"


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in _QUIET_LOG_MESSAGES)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process (call from an entry point, not a library)."""
    rank = int(os.environ.get("RANK", "0"))
    last = rank == int(os.environ.get("WORLD_SIZE", "1")) - 1
    handler = logging.StreamHandler(sys.stdout if rank == 0 or last else sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S")
    )
    handler.addFilter(_DropMessages())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    if last:
        logging.getLogger(PROGRESS_LOGGER).setLevel(level)
    # Megatron-Core logs every parameter and config at INFO; keep its warnings.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for name in ("torch.utils.cpp_extension",):
        logging.getLogger(name).addFilter(_DropMessages())
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
