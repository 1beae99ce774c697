"""Output layer + loss, forward and backward: time and peak memory against Megatron-Core.

What the last pipeline stage runs after the final norm, measured in one run on the same
inputs: hidden states [tokens, 1, h] (the model's dtype, bf16 by default) and this rank's
output-layer shard [v/tp, h], a Parameter with Megatron-Core DDP's fp32 `main_grad` buffer and
its backward hook (a gradient that arrives as `.grad` is added into `main_grad` and freed), at
each TP size (without sequence parallelism) over gloo on the CPU, or NCCL with a GPU per rank:

  mcore_ce        Megatron-Core's output-layer GEMM (`linear_with_grad_accumulation_and_
                  async_allreduce`, as ColumnParallelLinear calls it, after
                  `copy_to_tensor_model_parallel_region`), then `vocab_parallel_cross_entropy`
                  (the reference: 1.00)
  mcore_fused_ce  the same GEMM, then `fused_vocab_parallel_cross_entropy`
  dft             the same GEMM, then vocab_parallel_dft_cross_entropy (loss_type="dft")
  dft_fused       the same GEMM, then fused_vocab_parallel_dft_cross_entropy
  dft_chunked     chunked_output_layer_dft_cross_entropy (--dft-chunked-output-layer, chunks
                  of --chunk-tokens): the logits never exist whole

Time: the median of the timed calls; ratios: the median over repetitions of the ratio within
one repetition (round-robin, as bench_loss). Peak memory: what the call holds above its
inputs, the weight gradient included (benchmarks/common.py).

    python -m benchmarks.bench_output_layer                 # the README table
    python -m benchmarks.bench_output_layer --vocab 32000 --tp 1 --reps 2 --json out.json

`--json FILE` writes the rows as bench_loss does.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from benchmarks.common import parse_table_args, round_robin, run_table, table_parser

METHODS = ("mcore_ce", "mcore_fused_ce", "dft", "dft_fused", "dft_chunked")


def _ddp_weight(shard: torch.Tensor) -> torch.nn.Parameter:
    """The weight as Megatron-Core's DDP leaves it: fp32 `main_grad`, and a hook that adds an
    arriving `.grad` into it (unless the layer already did) and frees it."""
    weight = torch.nn.Parameter(shard)
    weight.main_grad = torch.zeros(shard.shape, dtype=torch.float32, device=shard.device)
    weight.grad_added_to_main_grad = False

    def hook(param):
        if not param.grad_added_to_main_grad:
            param.main_grad.add_(param.grad)
        param.grad = None

    weight.register_post_accumulate_grad_hook(hook)
    return weight


def make_methods(group, weight, chunk_tokens):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.layers import (
        linear_with_grad_accumulation_and_async_allreduce,
    )
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from dft_megatron.loss import (
        chunked_output_layer_dft_cross_entropy,
        fused_vocab_parallel_dft_cross_entropy,
        vocab_parallel_dft_cross_entropy,
    )

    def logits(hidden):  # ColumnParallelLinear's forward without sequence parallelism
        x = copy_to_tensor_model_parallel_region(hidden, group=group)
        return linear_with_grad_accumulation_and_async_allreduce(
            x, weight, None, False, False, False, tp_group=group
        )

    return {
        "mcore_ce": lambda h, t: vocab_parallel_cross_entropy(logits(h), t, tp_group=group),
        "mcore_fused_ce": lambda h, t: fused_vocab_parallel_cross_entropy(logits(h), t, group),
        "dft": lambda h, t: vocab_parallel_dft_cross_entropy(logits(h), t, tp_group=group),
        "dft_fused": lambda h, t: fused_vocab_parallel_dft_cross_entropy(
            logits(h), t, tp_group=group
        ),
        "dft_chunked": lambda h, t: chunked_output_layer_dft_cross_entropy(
            h, weight, t, tp_group=group, chunk_tokens=chunk_tokens
        ),
    }


def _worker(rank, world_size, args, out_path):
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.new_group(list(range(world_size)))
    results = {}
    for vocab in args.vocab:
        g = torch.Generator().manual_seed(1234)
        v = vocab // world_size
        full = torch.randn(vocab, args.hidden, generator=g) * args.hidden**-0.5 * 3
        weight = _ddp_weight(full[rank * v : (rank + 1) * v].to(args.dtype).to(device))
        del full
        hidden = torch.randn(args.tokens, 1, args.hidden, generator=g).to(args.dtype).to(device)
        target = torch.randint(0, vocab, (args.tokens, 1), generator=g).to(device)
        grad = torch.full((args.tokens, 1), 1.0 / args.tokens, device=device)
        methods = make_methods(group, weight, args.chunk_tokens)

        def setup(w=weight, h=hidden):
            w.main_grad.zero_()
            return h.clone().requires_grad_()

        got = round_robin(methods, args.methods, setup, target, grad, device, group, args)
        results.update({f"{vocab}/{name}": v for name, v in got.items()})
        del weight, methods
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def main(argv=None):
    from dft_megatron.loss.output_layer import DEFAULT_CHUNK_TOKENS

    parser = table_parser(__doc__.split("\n\n")[0], METHODS, warmup=1, reps=3)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size")
    parser.add_argument(
        "--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="dft_chunked's chunk"
    )
    args = parse_table_args(parser, argv)
    header = (
        f"{args.tokens} tokens, hidden {args.hidden}, {args.dtype} weights and hidden states, "
        f"chunks of {args.chunk_tokens} tokens"
    )
    run_table(_worker, args, header)


if __name__ == "__main__":
    main()
