"""A Megatron-LM checkpoint -> a Hugging Face folder, streaming.

Any torch_dist checkpoint the trainer, the import or plain Megatron-LM wrote: any TP x PP,
with or without optimizer state, the latest or a given iteration (Megatron-LM's
--ckpt-step). The architecture comes from the args stored in it; the weights are loaded at
TP1 x PP1 on CPU with Megatron-LM's `load_checkpoint` (`dist_checkpointing` reshards;
optimizer, scheduler and RNG states are not read), in the dtype they were saved in. Then
every Hugging Face tensor is cut out of its Megatron-Core
block (families.TensorMap; padded vocabulary rows dropped) and written, shard by shard, into
safetensors files of at most `max_shard_size` bytes: one `model.safetensors`, or
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, as transformers'
`save_pretrained` names them. Then config.json (the family's transformers config),
generation_config.json and the checkpoint's tokenizer files (SAVE/tokenizer).

Memory: one copy of the model plus one shard.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from dft_megatron.checkpoint import (
    checkpoint_dir,
    checkpoint_root,
    has_checkpoint,
    load_weights,
    model_config_from_args,
    stored_tokenizer,
)
from dft_megatron.checkpoint.paths import copy_tokenizer_files
from dft_megatron.convert.common import (
    dtype_name,
    megatron_model,
    parameters,
    prepare_output,
)
from dft_megatron.convert.families import (
    ConversionError,
    TensorMap,
    check_coverage,
    model_config_to_hf,
    moe_args_problems,
    tensor_maps,
)

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """ "5GB" -> 5 * 10**9 bytes ("GiB": 2**30), as transformers reads --max-shard-size."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r} must be > 0")
    return size


def resolve_checkpoint(megatron_dir: str | Path, iteration: int | None) -> tuple[Path, Path]:
    """(save directory, checkpoint folder): `iteration` of the save directory, or the one its
    tracker names (what --load picks); a path to an iter_NNNNNNN / release folder is itself."""
    root = checkpoint_root(megatron_dir)
    if root is None or not has_checkpoint(root):
        raise FileNotFoundError(
            f"{megatron_dir}: not a Megatron-LM save directory (no "
            "latest_checkpointed_iteration.txt); give the folder passed to --save"
        )
    given = Path(megatron_dir)
    if iteration is None:
        path = given if given != root else checkpoint_dir(root)
    else:
        path = root / f"iter_{iteration:07d}"
    if not (path / "metadata.json").is_file():
        found = sorted(p.name for p in root.iterdir() if p.name.startswith(("iter_", "release")))
        raise FileNotFoundError(
            f"{path} is not a complete torch_dist checkpoint; {root} holds "
            f"{', '.join(found) or 'none'}"
        )
    return root, path


def session_vocab_size(args) -> int:
    """The vocabulary of the model the session's args built (see models.provider)."""
    from megatron.training import get_tokenizer

    from dft_megatron.models.provider import model_vocab_size

    return model_vocab_size(args, get_tokenizer().vocab_size)


def load_flags(root: Path, path: Path) -> list[str]:
    """Megatron-LM flags that load checkpoint folder `path` of save directory `root`, weights
    only, with the architecture from its args."""
    flags = [f"--load={root}", "--use-checkpoint-args", "--no-load-optim", "--no-load-rng"]
    if path.name.startswith("iter_"):
        flags.append(f"--ckpt-step={int(path.name.removeprefix('iter_'))}")
    return flags


def saved_dtype(path: Path) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (that of its word embeddings)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(path))
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        raise ConversionError(f"{path}: no tensor {key}; not a GPT checkpoint")
    return meta[key].dtype


def shard_plan(maps: list[TensorMap], dtype: torch.dtype, max_bytes: int) -> list[list[TensorMap]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a bigger tensor alone)."""
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[TensorMap]] = [[]]
    used = 0
    for m in maps:
        nbytes = math.prod(m.hf_shape) * size
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        if nbytes > max_bytes:
            logger.warning(
                "%s (%d bytes) exceeds --max-shard-size: a shard of its own", m.hf_name, nbytes
            )
        shards[-1].append(m)
        used += nbytes
    return shards


def write_hf_weights(
    maps: list[TensorMap], params: dict[str, torch.Tensor], out: Path, max_bytes: int
) -> list[str]:
    """Write the mapped tensors of `params` into safetensors shards under `out`; returns the
    file names."""
    from safetensors.torch import save_file

    dtype = params[maps[0].megatron_name].dtype
    shards = shard_plan(maps, dtype, max_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]  # fmt: skip
    weight_map, total = {}, 0
    with torch.no_grad(), tqdm(total=len(maps), desc="export", unit="tensor") as bar:
        for name, shard in zip(names, shards, strict=True):
            tensors = {}
            for m in shard:
                block = m.block(params[m.megatron_name])
                tensors[m.hf_name] = block.reshape(m.hf_shape).clone(
                    memory_format=torch.contiguous_format
                )
                weight_map[m.hf_name] = name
                total += tensors[m.hf_name].numel() * tensors[m.hf_name].element_size()
                bar.update()
            save_file(tensors, out / name, metadata={"format": "pt"})
            del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _token_ids(tokenizer: Path | None) -> dict:
    """bos/eos/pad token ids: the tokenizer folder's generation_config.json (which the import
    carries over from the Hugging Face folder), else the tokenizer's own special tokens (a
    folder the trainer wrote holds the tokenizer files only)."""
    if tokenizer is None:
        return {}
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    if (tokenizer / "generation_config.json").is_file():
        gen = json.loads((tokenizer / "generation_config.json").read_text())
        return {k: gen[k] for k in keys if k in gen}
    if not (tokenizer / "tokenizer_config.json").is_file():
        return {}
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except Exception as e:  # a tokenizer transformers cannot load: no ids rather than no export
        logger.warning(
            "%s: tokenizer not loadable (%s); no bos/eos ids in config.json", tokenizer, e
        )
        return {}
    ids = {k: getattr(tok, k, None) for k in keys}
    return {k: v for k, v in ids.items() if isinstance(v, int)}


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    hf_dir: str | Path,
    *,
    iteration: int | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Export a checkpoint of `megatron_dir` (latest, or `iteration`) to `hf_dir`; returns it."""
    root, path = resolve_checkpoint(megatron_dir, iteration)
    tokenizer = stored_tokenizer(root)
    max_bytes = parse_size(max_shard_size)
    out = prepare_output(hf_dir, force, source=root)
    dtype = saved_dtype(path)
    with megatron_model(load_flags(root, path), dtype) as (args, chunks, net):
        problems = moe_args_problems(args)  # before any weight is read
        if problems:
            raise ConversionError(f"{path}: " + "; ".join(problems))
        loaded = load_weights(chunks)
        model = model_config_from_args(args, vocab_size=session_vocab_size(args))
        logger.info(
            "%s: iteration %d, trained at TP%d x PP%d, %s, %s layout",
            path,
            loaded,
            getattr(args, "checkpoint_tensor_model_parallel_size", 0) or 1,
            getattr(args, "checkpoint_pipeline_model_parallel_size", 0) or 1,
            dtype_name(dtype),
            model.family,
        )
        hf_config = model_config_to_hf(model, **_token_ids(tokenizer))
        params = parameters(net)
        check_coverage(model, params)
        files = write_hf_weights(tensor_maps(model), params, out, max_bytes)
        del net, params, chunks
    hf_config.dtype = dtype
    hf_config.save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    if not (out / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    logger.info("wrote %s: %s, config.json, generation_config.json", out, ", ".join(files))
    return out
