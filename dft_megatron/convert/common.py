"""What both conversion directions share: the one-process Megatron-Core set-up, the TP1 x PP1
model, output folders, tokenizer files and dtypes.

Conversion runs in one CPU process: a gloo world of 1, TP1 x PP1, Megatron-Core's local layer
spec. The checkpoint's global (sharded) keys are the same at every layout, so the TP1 x PP1
model reads and writes checkpoints of any TP x PP, and its keys are those of the
Transformer Engine spec too (the local spec maps its norm keys).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from dft_megatron.compat import install_cpu_bridge
from dft_megatron.convert.families import ConversionError
from dft_megatron.loss import TokenWeighting
from dft_megatron.models import ModelConfig, PrecisionConfig, build_gpt_model, transformer_config
from dft_megatron.models.gpt import DFTGPTModel

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Files of a Hugging Face folder that travel with a checkpoint (CKPT/tokenizer/): the
# tokenizer's, its chat template, and the generation defaults (bos/eos ids, sampling).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@contextmanager
def single_process(seed: int = 1234) -> Iterator[None]:
    """Megatron-Core ready in this process: gloo world of 1, TP1 x PP1, RNG tracker seeded.

    Re-entrant: whatever the caller has already set up (a world of 1, TP1 x PP1) is used and
    left in place; what this call creates it tears down.
    """
    if torch.cuda.is_available():
        raise RuntimeError(
            "conversion runs on CPU (memory-bound, one process); hide the GPUs with "
            "CUDA_VISIBLE_DEVICES= (tools/convert_*.py do)"
        )
    from dft_megatron.training.trainer import initialize_distributed

    install_cpu_bridge()
    made_world = not dist.is_initialized()
    if made_world:
        initialize_distributed()
    made_layout = False
    try:
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"conversion runs in one process; this one is rank {dist.get_rank()} of "
                f"{dist.get_world_size()}: launch it with python, not torchrun"
            )
        if parallel_state.model_parallel_is_initialized():
            tp = parallel_state.get_tensor_model_parallel_world_size()
            pp = parallel_state.get_pipeline_model_parallel_world_size()
            if (tp, pp) != (1, 1):
                raise RuntimeError(f"conversion needs TP1 x PP1, model parallel is TP{tp} x PP{pp}")
        else:
            parallel_state.initialize_model_parallel(1, 1)
            made_layout = True
            model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        if made_layout:
            parallel_state.destroy_model_parallel()
        if made_world:
            dist.destroy_process_group()


def build_model(model: ModelConfig, dtype: torch.dtype, *, initialize: bool = False) -> DFTGPTModel:
    """The whole model at TP1 x PP1 on CPU with `dtype` parameters, in eval mode.

    initialize=False leaves the weights uninitialized (torch.empty): for a model whose every
    element is written next (an import), it skips a random init of the whole model.
    """
    precision = PrecisionConfig(
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, transformer_impl="local"
    )
    tcfg = transformer_config(
        model, precision, transformer_impl="local", use_cpu_initialization=True
    )
    tcfg.perform_initialization = initialize
    net = build_gpt_model(
        model, tcfg, loss_weighting=TokenWeighting("sft"), pre_process=True, post_process=True
    )
    net.collect_stats = False
    # Norm weights are created in fp32 whatever params_dtype; the trainer's Float16Module casts
    # the whole module, so its bf16/fp16 checkpoints hold every tensor in that dtype: so here.
    return net.to(dtype).eval()


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


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    """Copy the TOKENIZER_FILES present in `src` into `dst` (created); returns their names."""
    if src is None or not src.is_dir():
        logger.warning("no tokenizer files to copy: the source has no tokenizer folder")
        return []
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not found:
        logger.warning("%s holds none of the tokenizer files %s", src, ", ".join(TOKENIZER_FILES))
        return []
    dst.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copy2(src / name, dst / name)
    logger.info("copied %s from %s to %s", ", ".join(found), src, dst)
    return found
