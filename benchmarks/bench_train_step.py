"""Training-step time of dft_megatron's trainer against a bare Megatron-Core loop.

Measured in one run, on the same model (a GPT with the local layer spec, dropout off) and
the same global batches, at each TP size over gloo (spawned ranks, one intra-op thread each)
or, with CUDA, over NCCL:

  trainer_dft   the trainer's step (`dft_megatron.training.trainer.train_step`: DDP,
                optimizer, LR scheduler) with --loss-type dft, as on a step it does not log:
                the fused DFT loss, the loss sum and token count, one metrics all-reduce
                (logged steps add the per-token statistics: see bench_loss's dft_stats)
  trainer_sft   the same with --loss-type sft
  mcore_bare    the reference (1.00): plain `GPTModel` (its default loss, Megatron-Core's
                `vocab_parallel_cross_entropy`), Megatron DDP, `get_megatron_optimizer`,
                `get_forward_backward_func`, `finalize_model_grads`, `optimizer.step()`;
                a loss function that returns the loss sum and token count, no metrics

The three share the initialization seed, so their first steps see the same weights and
batch: the first-step losses of trainer_sft and mcore_bare must agree (printed below the
table). DDP and optimizer settings are the trainer's in all three (fp32 grad reduction, NaN
check, Adam, clipping at 1.0), so the ratios show the cost of the loss and the metrics.

Timing: untimed warm-up steps, then repetitions in which every variant runs one step,
in an order that rotates each repetition (the machine drifts, and here the first in a
fixed order ran up to 1.4x slower, docs/LOG.md). Each time is rank 0's, from a barrier
to the end of the step. The table gives the median step time, the ratios as the median over
repetitions of the ratio within one repetition (robust to load that comes and goes on a shared
machine), and the peak memory held above the step's start (benchmarks/common.py).

Where CUDA is available the ranks run over NCCL, one GPU each (TP sizes above the GPU count
are refused); hide the GPUs (CUDA_VISIBLE_DEVICES='') to measure the CPU paths there.

    python -m benchmarks.bench_train_step                 # TP 1 and 2, 25 steps each
    python -m benchmarks.bench_train_step --tp 1 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from functools import partial

import torch
import torch.distributed as dist

from benchmarks.common import (
    MiB,
    command_line,
    measure_once,
    paired_ratio,
    spawn_ranks,
    summarize,
    versions,
)

VARIANTS = ("trainer_dft", "trainer_sft", "mcore_bare")


def _trainer_flags(args, tp: int, loss_type: str) -> list[str]:
    return [
        "--mock-data",
        "--num-layers", str(args.num_layers),
        "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads),
        "--seq-length", str(args.seq_length),
        "--vocab-size", str(args.vocab_size),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size),
        "--hidden-dropout", "0",
        "--attention-dropout", "0",
        "--tensor-model-parallel-size", str(tp),
        "--transformer-impl", "local",
        "--loss-type", loss_type,
        "--train-iters", "1000",  # the LR schedule stays near its peak over the benchmark
        "--lr-decay-style", "constant",
        "--seed", str(args.seed),
    ]  # fmt: skip


def _seed(seed: int) -> None:
    """The trainer's seeding (single pipeline stage), so every variant starts from one init."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


class _TrainerStep:
    """The trainer's model, optimizer and scheduler, stepped by `trainer.train_step`."""

    def __init__(self, cfg, device):
        from dft_megatron.training import trainer

        self.device = device
        _seed(cfg.optim.seed)
        self.model = trainer.build_model(cfg, "local")
        self.optimizer, self.scheduler = trainer.build_optimizer(cfg, self.model)
        self._train_step = trainer.train_step

    def __call__(self, batches) -> float:
        # A step that is not logged (the trainer collects per-token statistics, whose
        # entropy costs a pass over the softmax, only on the steps it logs).
        sums, _, _, _ = self._train_step(
            self.model, self.optimizer, self.scheduler, batches, self.device, collect_stats=False
        )
        return sums.summary()["loss"]


def _bare_loss_func(loss_mask, output_tensor):
    """Megatron-LM's per-token loss: (loss sum, token count, reported values)."""
    loss_mask = loss_mask.float()
    loss_sum = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}


def _bare_forward_step(device, data_iterator, model):
    batch = next(data_iterator).to(device)
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels)
    return output, partial(_bare_loss_func, batch.loss_mask)


class _BareMcoreStep:
    """Megatron-Core's lean loop (examples/run_simple_mcore_train_loop.py) on the same model."""

    def __init__(self, cfg, device):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from dft_megatron.models.gpt import gpt_model_kwargs, transformer_config

        m, o = cfg.model, cfg.optim
        tcfg = transformer_config(
            m,
            cfg.precision,
            tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
            transformer_impl="local",
        )
        tcfg.finalize_model_grads_func = finalize_model_grads
        _seed(o.seed)
        model = GPTModel(**gpt_model_kwargs(m, tcfg))
        if device.type == "cuda":
            model.cuda(device)
        # The trainer's DDP settings, so that the comparison isolates the loss and metrics.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, check_for_nan_in_grad=True
        )
        self.model = [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=model)]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                params_dtype=cfg.precision.params_dtype,
            ),
            self.model,
        )
        self.device = device

    def __call__(self, batches) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=partial(_bare_forward_step, self.device),
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=batches[0].tokens.shape[1],
            micro_batch_size=batches[0].tokens.shape[0],
            forward_only=False,
        )
        self.optimizer.step()
        total = torch.stack([r["lm loss"] for r in reported]).sum(0)
        return float(total[0] / total[1])


def _worker(rank, world_size, args, out_path):
    from megatron.core import parallel_state

    from dft_megatron.compat import install_cpu_bridge
    from dft_megatron.data import GlobalBatchSampler, MockDataset
    from dft_megatron.training.arguments import parse_args
    from dft_megatron.training.trainer import validate

    install_cpu_bridge()  # a no-op on GPU
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)

    steps = {}
    for name in VARIANTS:
        loss_type = "dft" if name == "trainer_dft" else "sft"
        cfg, _ = parse_args(_trainer_flags(args, world_size, loss_type))
        dp = validate(cfg, world_size, on_gpu)  # also fixes cfg.model.padded_vocab_size
        step_cls = _BareMcoreStep if name == "mcore_bare" else _TrainerStep
        steps[name] = step_cls(cfg, device)

    # A few distinct global batches, made once and cycled: data loading is not measured.
    m = cfg.model
    sampler = GlobalBatchSampler(
        MockDataset(m.vocab_size, m.seq_length, args.seed),
        args.global_batch_size,
        args.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        dp,
    )
    global_batches = [sampler.next_global_batch() for _ in range(4)]

    samples = {name: [] for name in VARIANTS}
    first_loss = {}
    for rep in range(args.warmup + args.reps):
        batches = global_batches[rep % len(global_batches)]
        shift = rep % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            losses = []
            sample = measure_once(
                lambda b, fn=steps[name], out=losses: out.append(fn(b)),
                lambda b=batches: b,
                device,
                barrier=dist.barrier,
            )
            if rep == 0:
                first_loss[name] = losses[0]
            if rep >= args.warmup:
                samples[name].append(sample)
    if rank == 0:
        results = {
            "seconds": {name: [t for t, _ in samples[name]] for name in VARIANTS},
            "peak_bytes": {name: summarize(samples[name])[1] for name in VARIANTS},
            "first_loss": first_loss,
        }
        with open(out_path, "w") as f:
            json.dump(results, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences")
    parser.add_argument("--global-batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--reps", type=int, default=25, help="timed steps per variant")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    rows, notes, backend = [], [], "gloo"
    for tp in args.tp:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            backend = spawn_ranks(_worker, tp, args, out)
            with open(out) as f:
                got = json.load(f)
        seconds, first = got["seconds"], got["first_loss"]
        for name in VARIANTS:
            rows.append(
                (
                    tp,
                    name,
                    statistics.median(seconds[name]) * 1e3,
                    paired_ratio(seconds, name, "mcore_bare"),
                    paired_ratio(seconds, name, "trainer_sft"),
                    got["peak_bytes"][name] / MiB,
                )
            )
        notes.append(
            f"TP {tp} first-step loss: trainer_sft {first['trainer_sft']:.6f}, mcore_bare "
            f"{first['mcore_bare']:.6f} (same init and batch: must agree); trainer_dft "
            f"{first['trainer_dft']:.6f}"
        )

    tokens = args.global_batch_size * args.seq_length
    ranks = "each rank: 1 thread" if backend == "gloo" else "NCCL, one GPU per rank"
    print(f"\n{command_line()}\n{versions()} (main process; {ranks})")
    print(
        f"model: {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_attention_heads} heads, seq {args.seq_length}, vocab {args.vocab_size}, "
        f"fp32, local layer spec; {args.global_batch_size} sequences ({tokens} tokens) per step "
        f"in micro-batches of {args.micro_batch_size}; {args.reps} steps per variant after "
        f"{args.warmup} warm-up; step ms: median; ratios: median over the repetitions of the "
        "ratio within one repetition\n"
    )
    print("| TP | variant | step ms | / mcore_bare | / trainer_sft | peak MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for tp, name, ms, rb, rs, mib in rows:
        print(f"| {tp} | {name} | {ms:.1f} | {rb:.3f} | {rs:.3f} | {mib:.0f} |")
    print()
    for tp in args.tp:
        r = {name: (rb, rs) for t, name, _, rb, rs, _ in rows if t == tp}
        print(
            f"TP {tp}: DFT / SFT = {r['trainer_dft'][1]:.3f} (target <= 1.02); "
            f"trainer (dft) / bare Megatron-Core = {r['trainer_dft'][0]:.3f}, "
            f"trainer (sft) / bare = {r['trainer_sft'][0]:.3f} (target <= 1.03)"
        )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
