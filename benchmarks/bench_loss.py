"""Forward+backward time and peak memory of the DFT loss against Megatron-Core's CE.

Measured in one run, on the same inputs (bf16 logits as a bf16 model produces them,
[tokens, v/tp] per rank), at each TP size over NCCL, one GPU per rank, where CUDA is
available (TP sizes above the GPU count are refused), else over gloo on the CPU:

  mcore_ce        Megatron-Core's vocab_parallel_cross_entropy        (the reference: 1.00)
  mcore_fused_ce  Megatron-Core's fused_vocab_parallel_cross_entropy (torch.compile-d)
  dft             dft_megatron's vocab_parallel_dft_cross_entropy, loss_type="dft"
  dft_stats       the same with return_stats=True (target prob and entropy, for logging)
  dft_fused       fused_vocab_parallel_dft_cross_entropy (--cross-entropy-loss-fusion)
  dft_fused_stats the same with return_stats=True
  dft_official    DFT as the paper's code computes it: CE, plus a second full softmax
                  whose target entry (gathered, detached) weights it
  ce_times_p      Megatron-Core's CE, then ce * exp(-ce).detach()

Time: the median of the timed calls; its ratio to mcore_ce is the median over repetitions
of the ratio within one repetition (every method runs once per repetition, round-robin),
which cancels load that comes and goes. Peak memory is what the call holds above its
inputs (see benchmarks/common.py).

    python -m benchmarks.bench_loss                       # the README table
    python -m benchmarks.bench_loss --tokens 1024 --vocab 32000 --tp 1 --reps 2 --json out.json

`--json FILE` writes the rows as a list of {"tp", "vocab", "tokens", "method", "ms",
"time_ratio_mcore_ce", "time_ratio_mcore_fused_ce", "peak_mib", "memory_ratio_mcore_ce"}.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from benchmarks.common import parse_table_args, round_robin, run_table, table_parser

METHODS = (
    "mcore_ce",
    "mcore_fused_ce",
    "dft",
    "dft_stats",
    "dft_fused",
    "dft_fused_stats",
    "dft_official",
    "ce_times_p",
)


def _vocab_parallel_target_prob(logits, target, group):
    """The paper's way: a full softmax over the (vocab-parallel) logits, then gather."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    z = logits.float()
    zmax = z.max(dim=-1, keepdim=True)[0]
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    exp = torch.exp(z - zmax)
    denom = exp.sum(dim=-1, keepdim=True)
    dist.all_reduce(denom, group=group)
    probs = exp / denom
    v = z.size(-1)
    local = target - rank * v
    in_shard = (local >= 0) & (local < v)
    p = probs.gather(-1, local.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1) * in_shard
    if tp > 1:
        dist.all_reduce(p, group=group)
    return p.detach()


def make_methods(group):
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from dft_megatron.loss import (
        fused_vocab_parallel_dft_cross_entropy,
        vocab_parallel_dft_cross_entropy,
    )

    def dft_official(x, t):
        p = _vocab_parallel_target_prob(x, t, group)
        return vocab_parallel_cross_entropy(x, t, tp_group=group) * p

    def ce_times_p(x, t):
        ce = vocab_parallel_cross_entropy(x, t, tp_group=group)
        return ce * torch.exp(-ce).detach()

    return {
        "mcore_ce": lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group=group),
        "mcore_fused_ce": lambda x, t: fused_vocab_parallel_cross_entropy(x, t, group),
        "dft": lambda x, t: vocab_parallel_dft_cross_entropy(x, t, tp_group=group),
        "dft_stats": lambda x, t: vocab_parallel_dft_cross_entropy(
            x, t, tp_group=group, return_stats=True
        )[0],
        "dft_fused": lambda x, t: fused_vocab_parallel_dft_cross_entropy(x, t, tp_group=group),
        "dft_fused_stats": lambda x, t: fused_vocab_parallel_dft_cross_entropy(
            x, t, tp_group=group, return_stats=True
        )[0],
        "dft_official": dft_official,
        "ce_times_p": ce_times_p,
    }


def _worker(rank, world_size, args, out_path):
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.new_group(list(range(world_size)))
    methods = make_methods(group)
    results = {}
    for vocab in args.vocab:
        g = torch.Generator().manual_seed(1234)
        logits = (torch.randn(args.tokens, vocab, generator=g) * 3).to(args.dtype)
        target = torch.randint(0, vocab, (args.tokens,), generator=g)
        v = vocab // world_size
        shard = logits[:, rank * v : (rank + 1) * v].contiguous().to(device)
        target = target.to(device)
        grad = torch.full((args.tokens,), 1.0 / args.tokens, device=device)
        del logits
        got = round_robin(
            methods, args.methods, lambda s=shard: s.clone().requires_grad_(), target, grad,
            device, group, args,
        )  # fmt: skip
        results.update({f"{vocab}/{name}": v for name, v in got.items()})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def main(argv=None):
    parser = table_parser(__doc__.split("\n\n")[0], METHODS, warmup=2, reps=5)
    args = parse_table_args(parser, argv)
    run_table(_worker, args, f"{args.tokens} tokens, {args.dtype} logits")


if __name__ == "__main__":
    main()
