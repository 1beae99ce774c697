"""Hugging Face folder -> a Megatron-LM checkpoint (torch_dist), streaming.

1. Read config.json (transformers' AutoConfig) into a ModelConfig, refusing what the mapping
   cannot express (families.hf_to_model_config).
2. Read the safetensors headers only (one file, or the shards an index lists) and check them
   against the mapping: a missing tensor, a tensor of the wrong shape or one the mapping
   does not know is refused, naming it, before any weight is read.
3. Build the model at TP1 x PP1 on CPU, uninitialized, in the target dtype, in a one-process
   Megatron-LM session with the model's Megatron-LM flags (checkpoint.model_flags), and copy
   every HF tensor into its block (families.TensorMap), one tensor at a time from the
   memory-mapped files; padded vocabulary rows are zeroed.
4. Save it with Megatron-LM's own `save_checkpoint` as a release checkpoint (weights and
   args, no optimizer): OUT/latest_checkpointed_iteration.txt ("release"), OUT/release/, so
   `--load OUT` (with or without --finetune) and `--eval-only` need no model flags and load
   at any TP x PP whose sizes divide the heads, query groups, layers and padded vocabulary.
   The tokenizer files go to OUT/tokenizer/, which the stored args name.

Memory: one copy of the model in the target dtype plus the HF tensor being copied (the
files are memory-mapped, so their pages are the kernel's to drop).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dft_megatron.checkpoint import TOKENIZER_DIR, model_flags, save_release
from dft_megatron.checkpoint.paths import copy_tokenizer_files
from dft_megatron.convert.common import (
    DTYPES,
    dtype_name,
    megatron_model,
    parameters,
    prepare_output,
)
from dft_megatron.convert.families import (
    ConversionError,
    TensorMap,
    check_coverage,
    hf_to_model_config,
    padded_rows,
    tensor_maps,
)
from dft_megatron.models import ModelConfig

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_hf_config(hf_dir: str | Path):
    """transformers' config of `hf_dir` (local files only)."""
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"--hf-dir {hf_dir}: no config.json")
    return AutoConfig.from_pretrained(hf_dir, local_files_only=True)


def hf_dtype(hf) -> torch.dtype:
    """The dtype the HF config declares (fp32 when it declares none)."""
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in DTYPES.values():
        raise ConversionError(f"config.json dtype {dtype}: give --dtype bf16, fp16 or fp32")
    return dtype


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} from the index, or from the one model.safetensors."""
    if (hf_dir / INDEX).is_file():
        weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ConversionError(f"{hf_dir / INDEX} lists {file.name}, which is missing")
        return files
    if (hf_dir / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(hf_dir / SINGLE, "pt") as f:
            return {name: hf_dir / SINGLE for name in f.keys()}  # noqa: SIM118
    others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
        p.name for p in hf_dir.glob("*.pt")
    )
    raise ConversionError(
        f"--hf-dir {hf_dir}: neither {INDEX} nor {SINGLE}"
        + (
            f" (found {', '.join(others)}: convert them to safetensors first, e.g. "
            "from_pretrained + save_pretrained with transformers)"
            if others
            else ""
        )
    )


@dataclass
class ImportPlan:
    """Which tensor of which file goes where, checked against the safetensors headers."""

    model: ModelConfig
    files: dict[Path, list[TensorMap]]
    """File -> the mapped tensors it holds, in file order."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Tensors present but not imported -> why (recomputed buffers, tied weights)."""


def _ignorable(name: str, model: ModelConfig) -> str | None:
    if name.endswith(".rotary_emb.inv_freq"):
        return "RoPE frequencies buffer; Megatron-Core recomputes it from rope_theta"
    if name == "lm_head.weight" and not model.untie_embeddings_and_output_weights:
        return "tie_word_embeddings: transformers uses model.embed_tokens.weight for it too"
    return None


def plan_import(model: ModelConfig, hf_dir: Path) -> ImportPlan:
    """Check the files' tensor names and shapes against the mapping (headers only)."""
    from safetensors import safe_open

    located = weight_files(hf_dir)
    maps = {m.hf_name: m for m in tensor_maps(model)}
    missing = [name for name in maps if name not in located]
    if missing:
        raise ConversionError(
            f"--hf-dir {hf_dir}: {len(missing)} tensor(s) that a {model.family} model with "
            f"this config.json needs are missing: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    plan = ImportPlan(model, {})
    unknown = []
    by_file: dict[Path, list[str]] = {}
    for name, file in located.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(file, "pt") as f:
            for name in names:
                if name not in maps:
                    reason = _ignorable(name, model)
                    if reason is None:
                        unknown.append(name)
                    else:
                        plan.skipped[name] = reason
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != maps[name].hf_shape:
                    raise ConversionError(
                        f"{file.name}: tensor {name} has shape {list(shape)}, config.json "
                        f"implies {list(maps[name].hf_shape)} (hidden_size, heads, "
                        "num_key_value_heads, head_dim, intermediate_size, vocab_size)"
                    )
                plan.files.setdefault(file, []).append(maps[name])
    if unknown:
        raise ConversionError(
            f"--hf-dir {hf_dir}: {len(unknown)} tensor(s) the {model.family} mapping does not "
            f"know (biases or layers config.json does not declare?): "
            f"{', '.join(sorted(unknown)[:8])}" + (" ..." if len(unknown) > 8 else "")
        )
    return plan


def load_hf_weights(plan: ImportPlan, net: torch.nn.Module) -> int:
    """Copy every planned tensor into `net` (TP1 x PP1) and zero the padded rows; returns the
    number of tensors copied."""
    from safetensors import safe_open

    params = parameters(net)
    check_coverage(plan.model, params)
    total = sum(len(v) for v in plan.files.values())
    done = 0
    with torch.no_grad(), tqdm(total=total, desc="import", unit="tensor") as bar:
        for name, rows in padded_rows(plan.model).items():
            params[name][rows].zero_()
        for file, maps in plan.files.items():
            with safe_open(file, "pt") as f:
                for m in maps:
                    block = m.block(params[m.megatron_name])
                    block.copy_(f.get_tensor(m.hf_name).reshape(block.shape))
                    done += 1
                    bar.update()
    return done


def convert_hf_to_megatron(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> Path:
    """Convert `hf_dir` into a release checkpoint under `megatron_dir`; returns its release folder.

    dtype: "bf16", "fp16", "fp32" or None (config.json's). tensor_model_parallel_size only sets
    the vocabulary padding multiple (make_vocab_size_divisible_by x it).
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    model = hf_to_model_config(
        hf,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else hf_dtype(hf)
    plan = plan_import(model, hf_dir)
    for name, reason in plan.skipped.items():
        logger.info("not imported: %s (%s)", name, reason)
    out = prepare_output(megatron_dir, force, source=hf_dir)
    logger.info(
        "%s: %d layers, hidden %d, %d heads / %d query groups, vocab %d (padded %d), %s",
        model.family,
        model.num_layers,
        model.hidden_size,
        model.num_attention_heads,
        model.num_query_groups,
        model.vocab_size,
        model.padded_vocab_size,
        dtype_name(target),
    )
    copied_tokenizer = copy_tokenizer_files(hf_dir, out / TOKENIZER_DIR)
    tokenizer_flags = (
        [f"--tokenizer-model={out / TOKENIZER_DIR}"]
        if "tokenizer_config.json" in copied_tokenizer
        else ["--tokenizer-type=NullTokenizer"]
    )
    flags = [*model_flags(model), *tokenizer_flags, f"--save={out}", "--save-interval=1"]
    with megatron_model(flags, target, padded_vocab_size=model.padded_vocab_size) as (
        _,
        chunks,
        net,
    ):
        copied = load_hf_weights(plan, net)
        path = save_release(chunks, out)
        del net, chunks
    logger.info("wrote %s (%d tensors)", path, copied)
    return path
