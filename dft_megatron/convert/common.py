"""What both conversion directions share: the one-process Megatron-LM session with the TP1 x
PP1 model, output folders, tokenizer files and dtypes.

Conversion runs in one CPU process: a gloo world of 1, TP1 x PP1, Megatron-Core's local layer
spec, the model built by the trainer's own model provider from Megatron-LM flags. The
checkpoint's global (sharded) keys are the same at every layout, so the TP1 x PP1 model reads
and writes checkpoints of any TP x PP, and its keys are those of the Transformer Engine spec
too (the local spec maps its norm keys).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dft_megatron.checkpoint import megatron_session
from dft_megatron.convert.families import ConversionError
from dft_megatron.models.gpt import DFTGPTModel

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# The dtype of the saved weights as Megatron-LM's precision flag.
DTYPE_FLAGS = {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"], torch.float32: []}


@contextmanager
def megatron_model(
    flags: list[str], dtype: torch.dtype, *, initialize: bool = False, **overrides
) -> Iterator[tuple[object, list[torch.nn.Module], DFTGPTModel]]:
    """The model that Megatron-LM `flags` describe, built as training builds it, whole (TP1 x
    PP1) on CPU with `dtype` parameters, in eval mode, inside a one-process Megatron-LM
    session (dft_megatron.checkpoint.megatron_session). Yields (args, the model chunks that
    Megatron-LM's save/load take, the DFTGPTModel itself).

    initialize=False leaves the weights uninitialized (Megatron-LM's --no-initialization): for
    a model whose every element is written next (an import), it skips a random init of it.
    """
    if torch.cuda.is_available():
        raise RuntimeError(
            "conversion runs on CPU (memory-bound, one process); hide the GPUs with "
            "CUDA_VISIBLE_DEVICES= (tools/convert_*.py do)"
        )
    from megatron.core.enums import ModelType
    from megatron.core.utils import unwrap_model
    from megatron.training import training

    from dft_megatron.models.provider import model_provider

    argv = [
        *flags,
        *DTYPE_FLAGS[dtype],
        "--use-cpu-initialization",
        "--micro-batch-size=1",
        "--loss-type=sft",
        "--ckpt-format=torch_dist",
        *([] if initialize else ["--no-initialization"]),
    ]
    with megatron_session(argv, training=False, **overrides) as args:
        # training.get_model looked up now: the CPU bridge wraps it.
        chunks = training.get_model(
            model_provider, ModelType.encoder_or_decoder, wrap_with_ddp=False
        )
        for chunk in chunks:
            chunk.eval()
        yield args, chunks, unwrap_model(chunks[0])


def parameters(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by state-dict name (Transformer Engine's `_extra_state` left out)."""
    return {
        k: v for k, v in net.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")
    }


def prepare_output(out: str | Path, force: bool, *, source: str | Path) -> Path:
    """An empty folder `out`. An existing non-empty one is replaced with `force`, else refused;
    never the source folder or one that contains it."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise ConversionError(f"output folder {out} is (or contains) the input folder {source}")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConversionError(
                f"output folder {out} is not empty; pass --force to replace its contents"
            )
        logger.warning("--force: removing the existing contents of %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
