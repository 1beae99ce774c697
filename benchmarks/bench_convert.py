"""Time and peak memory of the conversions, Hugging Face -> Megatron-LM checkpoint and back.

The model: Llama-3.2-1B's shape by default (16 layers, hidden 2048, 32 heads in 8 query
groups, ffn 8192, vocabulary 128256, tied embeddings: 1.24B parameters), bf16, random
weights written straight into safetensors files one shard at a time with
transformers' naming (no transformers model is instantiated), with its config.json. Then,
in this one process (CPU; each conversion opens its own one-process Megatron-LM session, as
tools/convert_*.py do):

  read          every tensor of the safetensors files read once into memory (the time unit)
  hf_load_save  transformers on the same folder: AutoModelForCausalLM.from_pretrained and
                save_pretrained (the reference: what transformers' own load and write of
                the model costs)
  hf_to_mcore   convert_hf_to_megatron: headers checked, model built by the trainer's model
                provider, tensors copied in, saved with Megatron-LM's save_checkpoint
                (torch_dist, a release checkpoint)
  mcore_to_hf   convert_megatron_to_hf: loaded at TP1 with Megatron-LM's load_checkpoint,
                tensors cut out and written in shards, config.json, generation_config.json

Before the timed repetitions, both conversions run once on a tiny model of the same family,
so that the imports, the first Megatron-LM session and dist_checkpointing's writer process
(started once per process) are not counted.

Time: seconds, and as a multiple of `read` measured in the same repetition (median over
repetitions). Peak memory: the resident set's high-water mark above its level at the start
(benchmarks/common.PeakMemory), as a multiple of the model's size in bytes. The resident set
counts the pages of memory-mapped safetensors files that were read while they stay mapped
(reclaimable page cache, but resident); the files are in the page cache (warm) for every
method. dist_checkpointing's writer and the multiprocessing manager it starts run in other
processes and are not counted.

    python -m benchmarks.bench_convert                 # the README table (~1B parameters)
    python -m benchmarks.bench_convert --num-layers 4 --reps 1    # a quicker, smaller run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# Conversion is a CPU job (as in tools/convert_*.py).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

from benchmarks.common import MiB, PeakMemory, command_line, versions  # noqa: E402


def write_random_hf_model(model, folder: Path, dtype: torch.dtype, max_shard_size: str) -> int:
    """Random weights for `model` (a ModelConfig) as a Hugging Face folder; returns bytes."""
    from safetensors.torch import save_file

    from dft_megatron.convert.families import model_config_to_hf, tensor_maps
    from dft_megatron.convert.megatron_to_hf import parse_size, shard_plan

    maps = tensor_maps(model)
    shards = shard_plan(maps, dtype, parse_size(max_shard_size))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    total, weight_map = 0, {}
    for name, shard in zip(names, shards, strict=True):
        tensors = {}
        for m in shard:
            t = torch.empty(m.hf_shape, dtype=torch.float32)
            if "norm" in m.hf_name:
                t.fill_(1.0)
            else:
                t.normal_(0.0, model.init_method_std, generator=gen)
            tensors[m.hf_name] = t.to(dtype)
            weight_map[m.hf_name] = name
            total += tensors[m.hf_name].numel() * tensors[m.hf_name].element_size()
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        import json

        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = model_config_to_hf(model, bos_token_id=128000, eos_token_id=128001)
    config.dtype = dtype
    config.save_pretrained(folder)
    return total


def read_once(folder: Path) -> None:
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                # get_tensor may hand out a view of the memory-mapped file: copy to read it.
                f.get_tensor(name).clone()


def hf_load_save(folder: Path, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """transformers' own load and write of the model (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    del model


def llama(**sizes):
    """A Llama-3.2-shaped ModelConfig (RoPE scaling, GQA, tied embeddings) of these sizes."""
    from dft_megatron.models import ModelConfig

    return ModelConfig(
        family="llama",
        max_position_embeddings=131072,
        position_embedding_type="rope",
        rotary_base=500000,
        rope_scaling=True,
        rope_scaling_factor=32.0,
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=False,
        **sizes,
    )


def timed(fn) -> tuple[float, int]:
    with PeakMemory(torch.device("cpu")) as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=8192)
    p.add_argument("--num-attention-heads", type=int, default=32)
    p.add_argument("--num-query-groups", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument(
        "--max-shard-size", default="5GB", help="shards of the HF files, both directions"
    )
    p.add_argument("--reps", type=int, default=2, help="repetitions (median)")
    p.add_argument("--tmp", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    from dft_megatron.convert.common import DTYPES
    from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    dtype = DTYPES[args.dtype]
    model = llama(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        vocab_size=args.vocab_size,
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        work = Path(tmp)
        # Warm-up (untimed): imports, the first session, dist_checkpointing's writer process.
        tiny = llama(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=256)  # fmt: skip
        write_random_hf_model(tiny, work / "tiny", dtype, args.max_shard_size)
        convert_hf_to_megatron(work / "tiny", work / "tiny_mcore")
        convert_megatron_to_hf(work / "tiny_mcore", work / "tiny_back")
        hf_load_save(work / "tiny", work / "tiny_hf", dtype, args.max_shard_size)

        hf, mcore, back, resaved = work / "hf", work / "mcore", work / "back", work / "resaved"
        t0 = time.perf_counter()
        size = write_random_hf_model(model, hf, dtype, args.max_shard_size)
        params = size // dtype.itemsize
        print(f"wrote {params / 1e9:.2f}B parameters ({size / MiB:.0f} MiB) in "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        samples = {k: [] for k in ("read", "hf_load_save", "hf_to_mcore", "mcore_to_hf")}
        for rep in range(args.reps):
            for path in (mcore, back, resaved):
                shutil.rmtree(path, ignore_errors=True)
            samples["read"].append(timed(lambda: read_once(hf)))
            samples["hf_load_save"].append(
                timed(lambda: hf_load_save(hf, resaved, dtype, args.max_shard_size))
            )
            samples["hf_to_mcore"].append(timed(lambda: convert_hf_to_megatron(hf, mcore)))
            samples["mcore_to_hf"].append(
                timed(
                    lambda: convert_megatron_to_hf(mcore, back, max_shard_size=args.max_shard_size)
                )
            )
            print(f"repetition {rep + 1}: " + ", ".join(
                f"{k} {v[-1][0]:.1f} s / {v[-1][1] / MiB:.0f} MiB" for k, v in samples.items()
            ))  # fmt: skip

    print(f"\n{command_line()}\n{versions()}")
    print(
        f"model: llama, {args.num_layers} layers, hidden {args.hidden_size}, ffn "
        f"{args.ffn_hidden_size}, {args.num_attention_heads} heads / {args.num_query_groups} "
        f"query groups, vocab {args.vocab_size}, tied embeddings; {params / 1e9:.2f}B parameters, "
        f"{args.dtype}, {size / MiB:.0f} MiB; shards <= {args.max_shard_size}; "
        f"median of {args.reps}\n"
    )
    print("| direction | seconds | time / read once | peak MiB | peak / model bytes |")
    print("|---|---:|---:|---:|---:|")
    for key in samples:
        seconds = statistics.median(t for t, _ in samples[key])
        ratio = statistics.median(
            t / r for (t, _), (r, _) in zip(samples[key], samples["read"], strict=True)
        )
        peak = max(m for _, m in samples[key])
        print(f"| {key} | {seconds:.1f} | {ratio:.2f} | {peak / MiB:.0f} | {peak / size:.2f} |")


if __name__ == "__main__":  # also: dist_checkpointing's writer process imports this module
    main()
