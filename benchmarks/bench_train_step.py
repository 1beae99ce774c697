"""Training-step time of dft_megatron in Megatron-LM's trainer against plain Megatron-Core GPT.

Every variant is stepped by Megatron-LM's own `megatron.training.training.train_step` (zero
the DDP grad buffers, the forward-backward schedule over the global batch's micro-batches,
`finalize_model_grads`, `optimizer.step()` with clipping, the LR scheduler, the "lm loss"
all-reduce), with the model, DDP wrapper, optimizer and scheduler of Megatron-LM's
`setup_model_and_optimizer`, all from one set of Megatron-LM flags:

  engine_dft   DFTGPTModel (dft_megatron.models.provider.model_provider) stepped with
               dft_megatron's forward_step (dft_megatron.training.step) at --loss-type dft,
               as in a real run: the fused DFT loss with its per-token statistics, the
               report pairs, `DFTMetrics` collecting every micro-batch
  engine_sft   the same with --loss-type sft
  engine_dft_fused    engine_dft with --cross-entropy-loss-fusion (the fused DFT loss)
  engine_dft_chunked  engine_dft with --dft-chunked-output-layer (output layer + loss over
               chunks of --dft-output-chunk-tokens tokens)
  mcore_gpt    the reference (1.00): Megatron-Core's plain `GPTModel` (its own loss,
               `vocab_parallel_cross_entropy`) from the same args and layer spec, with a
               forward step and loss function in the shape of Megatron-LM's pretrain_gpt.py
               (loss sum and token count, the "lm loss" report, its NaN/Inf checks), no
               DFT metrics

Each TP size (1 and 2 by default) is one Megatron-LM session on as many spawned ranks (DP 1),
over gloo (one intra-op thread each) or, with CUDA, over NCCL: `parse_megatron_args`
(Megatron-LM's parser with DFT's flags), `initialize_megatron`, then the three variants built
in the same processes, each right after Megatron-LM's seeding is repeated
(`initialize._set_random_seed(--seed)`), so they start from the same weights. The global
batches come from Megatron-LM's data iterator on dft_megatron's `DatasetsProvider`
(--mock-data), drawn once before timing and replayed: data loading is not measured, and all
variants see the same batches. Their first steps see the same weights and batch, so the
first-step "lm loss" of engine_sft and mcore_gpt must agree (checked and printed below the
table; engine_dft's "lm loss" is the DFT loss) where the vocabulary needs no padding (the
default's 32000 at TP 1 and 2): DFTGPTModel masks padded vocabulary columns out of the softmax,
GPTModel does not.

What train() does around train_step is done once per variant before timing (model.train(),
config.grad_scale_func / timers / finalize_model_grads_func); after each step the DFT variants'
metric sums are handed over as dft_megatron's hook on Megatron-LM's `training_log` does on an
iteration it does not log (`DFTMetrics.log_train(log=False)`), outside the timed region.
Logged iterations (every --log-interval) add one all-reduce of the sums and the JSONL record.

Timing: untimed warm-up steps, then repetitions in which every variant runs one step, in an
order that rotates each repetition (the machine drifts, and the first in a fixed order ran up
to 1.4x slower, docs/LOG.md). Each time is rank 0's, from a barrier to the end of the step.
The table gives the median step time, the ratios as the median over repetitions of the ratio
within one repetition (robust to load that comes and goes on a shared machine), and the peak
memory held above the step's start (benchmarks/common.py); the header gives the machine's load
average at the start and end of the run (other work on it shows in the times). `--json FILE`
also writes the rows as a list of {"tp", "method", "ms", "time_ratio_mcore", "time_ratio_sft",
"time_ratio_dft", "peak_mib", "memory_ratio_dft"} (None where the reference was not run).

Arguments this script does not know are Megatron-LM flags, applied after its defaults
(`MEGATRON_FLAGS`), e.g. `--hidden-size 512 --num-layers 8`; the TP size comes from --tp and the
loss type from the variant. Where CUDA is available the ranks run over NCCL, one GPU each
(TP sizes above the GPU count are refused); hide the GPUs (CUDA_VISIBLE_DEVICES='') to
measure the CPU paths there.

    python -m benchmarks.bench_train_step                 # TP 1 and 2, 8 steps each
    python -m benchmarks.bench_train_step --tp 1 --reps 5 --json out.json
    python -m benchmarks.bench_train_step --tp 2 --seq-length 512 --max-position-embeddings 512
    python -m benchmarks.bench_train_step --tp 1 --variants engine_dft engine_dft_chunked \\
        --bf16 --hidden-size 1024 --seq-length 4096 --vocab-size 152064 ...   # the memory row
"""

from __future__ import annotations

import argparse
import json
import math
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

VARIANT_ARGS = {
    "engine_dft": dict(loss_type="dft"),
    "engine_sft": dict(loss_type="sft"),
    "mcore_gpt": dict(loss_type="sft"),
    "engine_dft_fused": dict(loss_type="dft", cross_entropy_loss_fusion=True),
    "engine_dft_chunked": dict(loss_type="dft", dft_chunked_output_layer=True),
}
"""Megatron-LM args each variant's model is built with (set for the duration of its setup)."""
DEFAULT_VARIANTS = ("engine_dft", "engine_sft", "mcore_gpt")
REFERENCE = "mcore_gpt"
RATIO_COLUMNS = {"mcore_gpt": "mcore", "engine_sft": "sft", "engine_dft": "dft"}
"""Variant -> the `time_ratio_*` key of the ratio to it (where it was run)."""

MEGATRON_FLAGS = [
    "--num-layers", "4",
    "--hidden-size", "256",
    "--num-attention-heads", "8",
    "--seq-length", "256",
    "--max-position-embeddings", "256",
    "--vocab-size", "32000",
    "--tokenizer-type", "NullTokenizer",
    "--micro-batch-size", "2",
    "--global-batch-size", "8",
    "--lr", "1e-4",
    "--lr-decay-style", "constant",
    "--train-iters", "1000",  # sizes Megatron-LM's mock training set; never run to the end
    "--mock-data",
    "--hidden-dropout", "0",
    "--attention-dropout", "0",
    "--seed", "1234",
]  # fmt: skip
"""Megatron-LM flags of every variant (the command line's own Megatron-LM flags follow)."""

_SET_HERE = ("--tensor-model-parallel-size", "--loss-type")
_GLOBAL_BATCHES = 4  # distinct global batches, drawn once and cycled


# ------------------------------------------------------------------ the mcore_gpt reference


def mcore_gpt_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config=None,
    pg_collection=None,
):
    """Megatron-Core's plain GPTModel from Megatron-LM's args: DFTGPTModel's constructor
    arguments (dft_megatron.models.provider) without the DFT loss and vocabulary masking."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import get_args

    from dft_megatron.models.provider import gpt_model_kwargs_from_args

    return GPTModel(
        **gpt_model_kwargs_from_args(
            get_args(),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            config=config,
            pg_collection=pg_collection,
        )
    )


def mcore_get_batch(data_iterator, device: torch.device):
    """One micro-batch as pretrain_gpt.py's get_batch returns it (every rank reads its own copy,
    as dft_megatron's forward_step does, instead of a broadcast from TP rank 0)."""
    fields = next(data_iterator)
    tokens_ = fields["tokens"].to(device)
    tokens, labels = tokens_[:, :-1].contiguous(), tokens_[:, 1:].contiguous()
    loss_mask = fields["loss_mask"].to(device).float()
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    return tokens, labels, loss_mask, None, position_ids


def mcore_loss_func(loss_mask, output_tensor, model=None):
    """pretrain_gpt.py's loss_func: loss sum, token count, {"lm loss": [sum, count]}."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if args.check_for_nan_in_loss_and_grad:
        rerun_state_machine = get_rerun_state_machine()
        for rejection_func, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun_state_machine.validate_result(
                result=loss,
                rejection_func=rejection_func,
                message=f"found {what} in local forward loss calculation",
                tolerance=0.0,
                fatal=True,
            )
    return loss, num_tokens, report


def mcore_forward_step(data_iterator, model):
    """pretrain_gpt.py's forward_step (no timers, straggler detector or ModelOpt)."""
    device = next(model.parameters()).device
    tokens, labels, loss_mask, attention_mask, position_ids = mcore_get_batch(data_iterator, device)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(mcore_loss_func, loss_mask, model=model)


# ------------------------------------------------------------------ one variant


class _Variant:
    """One model, optimizer and scheduler of `setup_model_and_optimizer`, stepped by
    Megatron-LM's `train_step` as `train()` calls it."""

    def __init__(self, name: str, args):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.enums import ModelType
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config
        from megatron.training import get_timers, initialize, training

        from dft_megatron.models.provider import model_provider
        from dft_megatron.training.metrics import DFTMetrics
        from dft_megatron.training.step import forward_step

        self.name = name
        self._training = training
        # The seeding of initialize_megatron again: every variant starts from the same weights.
        initialize._set_random_seed(
            args.seed,
            args.data_parallel_random_init,
            args.te_rng_tracker,
            args.inference_rng_tracker,
            use_cudagraphable_rng=args.cuda_graph_impl != "none",
        )
        if name == REFERENCE:
            provider, self.metrics = mcore_gpt_provider, None
            self.forward_step_func = mcore_forward_step
        else:
            provider, self.metrics = model_provider, DFTMetrics(None)
            self.forward_step_func = partial(
                forward_step, self.metrics, args.check_for_nan_in_loss_and_grad
            )
        # model_provider and the model's TransformerConfig read these.
        saved = {key: getattr(args, key) for key in VARIANT_ARGS[name]}
        vars(args).update(VARIANT_ARGS[name])
        try:
            self.model, self.optimizer, self.scheduler = training.setup_model_and_optimizer(
                ModelType.encoder_or_decoder, model_provider_func=provider
            )
        finally:
            vars(args).update(saved)
        # What train() sets up before its loop (no --overlap-grad-reduce / param-gather here).
        for chunk in self.model:
            chunk.train()
        self.config = get_model_config(self.model[0])
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.timers = get_timers()
        if self.config.finalize_model_grads_func is None:
            self.config.finalize_model_grads_func = finalize_model_grads
        self.forward_backward_func = get_forward_backward_func(schedule_pg_collection=None)
        self.iteration = self.skipped = 0

    def step(self, data_iterator) -> float:
        """One train_step; returns its "lm loss" (the global token mean)."""
        loss_dict, skipped, *_ = self._training.train_step(
            self.forward_step_func,
            data_iterator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.config,
            self.forward_backward_func,
            iteration=self.iteration,
        )
        self.skipped += int(skipped)  # counted and reported (fp16: the loss scaler skips)
        return float(loss_dict["lm loss"])

    def after_step(self) -> None:
        """What training_log's DFT hook does on an iteration it does not log."""
        self.iteration += 1
        if self.metrics is not None:
            self.metrics.log_train(self.iteration, None, None, False, log=False)


# ------------------------------------------------------------------ per rank


def _worker(rank, world_size, megatron_argv, bench, out_path):
    from dft_megatron.compat.megatron_training import (
        install_megatron_training_cpu_bridge,
        install_megatron_training_fixes,
    )

    install_megatron_training_fixes()
    install_megatron_training_cpu_bridge()  # a no-op on GPU
    from dft_megatron.compat import install_distributed_optimizer_fixes

    install_distributed_optimizer_fixes()

    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.training import get_tokenizer, initialize, training

    from dft_megatron.data.provider import DatasetsProvider
    from dft_megatron.training.arguments import data_config, parse_megatron_args

    args = parse_megatron_args([*megatron_argv, "--tensor-model-parallel-size", str(world_size)])
    initialize.initialize_megatron()  # looked up now: the CPU bridge wraps it
    on_gpu = torch.cuda.is_available() and args.distributed_backend == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    variants = tuple(bench.variants)
    steps = {name: _Variant(name, args) for name in variants}

    # Megatron-LM's data iterator on dft_megatron's provider; a few global batches drawn once.
    provider = DatasetsProvider(args, data_config(args), None, get_tokenizer().vocab_size)
    train_iterator, _, _ = training.build_train_valid_test_data_iterators(provider)
    num_microbatches = get_num_microbatches()
    global_batches = [
        [next(train_iterator) for _ in range(num_microbatches)] for _ in range(_GLOBAL_BATCHES)
    ]

    samples = {name: [] for name in variants}
    first_loss = {}
    for rep in range(bench.warmup + bench.reps):
        batches = global_batches[rep % len(global_batches)]
        shift = rep % len(variants)
        for name in variants[shift:] + variants[:shift]:
            variant, losses = steps[name], []
            sample = measure_once(
                lambda it, v=variant, out=losses: out.append(v.step(it)),
                lambda b=batches: RerunDataIterator(iter(b)),  # as Megatron-LM wraps it
                device,
                barrier=dist.barrier,
            )
            variant.after_step()
            if rep == 0:
                first_loss[name] = losses[0]
            if rep >= bench.warmup:
                samples[name].append(sample)
    if rank == 0:
        results = {
            "seconds": {name: [t for t, _ in samples[name]] for name in variants},
            "peak_bytes": {name: summarize(samples[name])[1] for name in variants},
            "first_loss": first_loss,
            "skipped": {name: steps[name].skipped for name in variants},
            "setup": {
                "transformer_impl": args.transformer_impl,
                "params_dtype": str(args.params_dtype).removeprefix("torch."),
                "padded_vocab_size": args.padded_vocab_size,
                "vocab_size": get_tokenizer().vocab_size,
                "num_microbatches": num_microbatches,
                "tokens_per_step": args.global_batch_size * args.seq_length,
            },
        }
        with open(out_path, "w") as f:
            json.dump(results, f)


# ------------------------------------------------------------------ the report


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Megatron-LM flags, applied after the defaults: "
        + " ".join(MEGATRON_FLAGS),
        allow_abbrev=False,
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--reps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANT_ARGS),
        help="what to step (the first is the reference of the ratios when mcore_gpt and "
        "engine_sft are not among them)",
    )
    bench, extra = parser.parse_known_args(argv)
    for flag in _SET_HERE:
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            parser.error(f"{flag} is set by the benchmark (--tp, and the variant)")
    if bench.reps < 1:
        parser.error("--reps must be at least 1")
    megatron_argv = [*MEGATRON_FLAGS, *extra]

    load_start = os.getloadavg()[0]
    rows, notes, setup, backend = [], [], {}, "gloo"
    for tp in bench.tp:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            backend = spawn_ranks(_worker, tp, megatron_argv, bench, out)
            with open(out) as f:
                got = json.load(f)
        seconds, first, setup = got["seconds"], got["first_loss"], got["setup"]
        peak = got["peak_bytes"]
        for name in bench.variants:
            row = {"tp": tp, "method": name, "ms": statistics.median(seconds[name]) * 1e3}
            for ref, key in RATIO_COLUMNS.items():
                row[f"time_ratio_{key}"] = (
                    paired_ratio(seconds, name, ref) if ref in seconds else None
                )
            row["peak_mib"] = peak[name] / MiB
            base = peak.get("engine_dft")
            row["memory_ratio_dft"] = peak[name] / base if base else None
            rows.append(row)
        if "engine_sft" in first and REFERENCE in first:
            sft, ref = first["engine_sft"], first[REFERENCE]
            agree = math.isclose(sft, ref, rel_tol=1e-5, abs_tol=1e-6)
            padded = setup["padded_vocab_size"] - setup["vocab_size"]
            must = (
                "same weights and batch: must agree"
                if padded <= 0
                else f"the {padded} padded vocabulary columns are masked out of the softmax by "
                "DFTGPTModel, not by GPTModel: give a --vocab-size that needs no padding to "
                "compare"
            )
            notes.append(
                f"TP {tp} first-step lm loss: engine_sft {sft:.6f}, mcore_gpt {ref:.6f} "
                f"(difference {sft - ref:.2e}: {'agree' if agree else 'DIFFER'}; {must})"
            )
        dft_losses = {k: v for k, v in first.items() if k.startswith("engine_dft")}
        notes.append(
            f"TP {tp} first-step DFT loss: "
            + ", ".join(f"{k} {v:.8g}" for k, v in dft_losses.items())
            + " (same weights and batch: must agree to fp32 rounding)"
        )
        if any(got["skipped"].values()):
            notes.append(f"TP {tp} optimizer steps skipped (loss scaling): {got['skipped']}")

    ranks = "each rank: 1 thread, gloo" if backend == "gloo" else "NCCL, one GPU per rank"
    load = f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"\n{command_line()}\n{versions()} (main process; {ranks}); {load}")
    print(f"Megatron-LM flags: {' '.join(megatron_argv)}")
    print(
        f"{setup['transformer_impl']} layer spec, {setup['params_dtype']}, padded vocab "
        f"{setup['padded_vocab_size']}; {setup['tokens_per_step']} tokens per step in "
        f"{setup['num_microbatches']} micro-batches; {bench.reps} steps per variant after "
        f"{bench.warmup} warm-up, round-robin in a rotating order; step ms: median; ratios: "
        "median over the repetitions of the ratio within one repetition\n"
    )
    refs = [ref for ref in RATIO_COLUMNS if ref in bench.variants]
    print(
        "| TP | method | step ms | "
        + "".join(f"/ {ref} | " for ref in refs)
        + "peak MiB | memory / engine_dft |"
    )
    print("|---:|---|---:|" + "---:|" * len(refs) + "---:|---:|")

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        ratios = "".join(f"{r[f'time_ratio_{RATIO_COLUMNS[ref]}']:.3f} | " for ref in refs)
        print(
            f"| {r['tp']} | {r['method']} | {r['ms']:.1f} | {ratios}{r['peak_mib']:.0f} | "
            f"{fmt(r['memory_ratio_dft'], '.3f')} |"
        )
    print()
    for note in notes:
        print(note)
    if bench.json:
        with open(bench.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
