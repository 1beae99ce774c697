"""DFT's metrics in Megatron-LM's trainer: the target-probability histogram and the JSONL.

Megatron-LM's own iteration line, TensorBoard scalars and validation line carry the
averages that `loss_func` reports (training/step.py). What they cannot carry is added here:
every micro-batch's loss function (on the last pipeline stage) adds masked sums of the
per-token loss and statistics to `DFTMetrics`; once per iteration Megatron-LM's
`training_log` runs on every rank, and `install_hooks` makes it also, on logged iterations,
SUM all-reduce those sums over the world (the ranks that computed no loss add zeros), write
the p histogram (20 bins over [0, 1]: the paper's Figure 2 view) to Megatron-LM's
TensorBoard writer, append the iteration's record to `--log-metrics-jsonl` (with the MoE
router's losses that Megatron-LM's line reports, for an MoE model) and print the progress
line with the ETA; validation (`evaluate_and_print_results`) the same with its own
sums. Nothing here holds per-token tensors past the micro-batch.

Target-probability regimes: the fractions of target tokens with p < 0.01, 0.01-0.5,
0.5-0.99 and > 0.99 show whether DFT's base model puts mass on the targets (DFT
polarizes p: tokens it cannot learn sink below 0.01).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

REGIME_EDGES = (0.01, 0.5, 0.99)
REGIME_NAMES = ("p<0.01", "p 0.01-0.5", "p 0.5-0.99", "p>0.99")
HIST_BINS = 20
_SCALARS = ("loss", "ce_loss", "target_prob", "entropy", "tokens", "kl", "kl_tokens")
_REGIMES = len(_SCALARS)  # where the regime counts start in the vector
_WIDTH = len(_SCALARS) + len(REGIME_NAMES) + HIST_BINS


class MetricSums:
    """Masked sums over target tokens, accumulated over micro-batches, as one fp64 vector."""

    def __init__(self):
        self.values = torch.zeros(_WIDTH, dtype=torch.float64)

    def add(self, loss, stats, mask) -> None:
        """loss, stats fields and mask: [b, s]; mask 1.0 on target tokens. Without stats
        (None) only the loss sum and the token count; without the entropy (None) its sum
        stays 0."""
        m = mask.bool()
        if stats is None:
            self.values[0] += loss.detach()[m].double().sum().cpu()
            self.values[4] += float(m.sum())
            return
        # Computed where the per-token tensors live (the GPU in a CUDA run), moved once.
        p = stats.target_prob[m].double()
        edges = torch.tensor(REGIME_EDGES, dtype=torch.float64, device=p.device)
        regimes = torch.bucketize(p, edges)
        hist = (p * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        row = torch.cat(
            [
                torch.stack(
                    [
                        loss.detach()[m].double().sum(),
                        stats.cross_entropy[m].double().sum(),
                        p.sum(),
                        p.new_zeros(())
                        if stats.entropy is None
                        else stats.entropy[m].double().sum(),
                        p.new_tensor(float(p.numel())),
                        p.new_zeros(()) if stats.kl is None else stats.kl[m].double().sum(),
                        p.new_tensor(0.0 if stats.kl is None else float(p.numel())),
                    ]
                ),
                torch.bincount(regimes, minlength=len(REGIME_NAMES)).double(),
                torch.bincount(hist, minlength=HIST_BINS).double(),
            ]
        )
        self.values += row.cpu()

    def all_reduce(self, device: torch.device) -> None:
        """Sum over every rank of the world (in place)."""
        t = self.values.to(device)
        dist.all_reduce(t)
        self.values = t.cpu()

    def summary(self) -> dict[str, float]:
        """Token means (NaN if no target token) and the regime fractions."""
        v = self.values.tolist()
        tokens = v[4]
        mean = (lambda s: s / tokens) if tokens else (lambda s: math.nan)
        out = {
            "loss": mean(v[0]),
            "ce_loss": mean(v[1]),
            "target_prob_mean": mean(v[2]),
            "entropy": mean(v[3]),
            "tokens": int(tokens),
        }
        kl, kl_tokens = v[_SCALARS.index("kl")], v[_SCALARS.index("kl_tokens")]
        if kl_tokens:  # asft: its KL term, without the coefficient
            out["kl"] = kl / kl_tokens
        regimes = v[_REGIMES : _REGIMES + len(REGIME_NAMES)]
        out.update({name: mean(c) for name, c in zip(REGIME_NAMES, regimes, strict=True)})
        return out

    def histogram(self) -> list[float]:
        return self.values[_REGIMES + len(REGIME_NAMES) :].tolist()


_last_logged: dict | None = None


def last_logged() -> dict | None:
    """{iteration, lr, grad_norm} of the last finished training iteration (for diagnoses)."""
    return _last_logged


class DFTMetrics:
    """Per-iteration sums of the training micro-batches and per-evaluation sums of the
    validation ones, and where they are written (global rank world - 1, Megatron-LM's
    logging rank, which holds its TensorBoard writer)."""

    def __init__(self, jsonl_path: str | None):
        self.train = MetricSums()
        self.valid = MetricSums()
        self.jsonl_path = jsonl_path
        self.start: tuple[float, int] | None = None  # (time, iteration) of the first log call
        self.router_losses: dict[str, float] = {}
        """Megatron-Core's MoE router losses of the iteration just reported (name -> value,
        as its iteration line shows them: the mean over MoE layers and micro-batches,
        without the coefficient); empty for a dense model."""
        self.sft_mix: float | None = None
        """The SFT mix of the --sft-mix-decay-iters schedule at the last step (None without
        one); written into the training records."""

    def add(self, loss, stats, mask, *, training: bool) -> None:
        (self.train if training else self.valid).add(loss, stats, mask)

    @staticmethod
    def wants_entropy(training: bool) -> bool:
        """Whether this micro-batch's iteration is logged (validation always is)."""
        from megatron.training import get_args

        args = get_args()
        iteration = getattr(args, "curr_iteration", 0)  # set by Megatron-LM's train loop
        return not training or (iteration + 1) % args.log_interval == 0

    @staticmethod
    def is_logging_rank() -> bool:
        return dist.get_rank() == dist.get_world_size() - 1

    def _write(self, record: dict) -> None:
        if self.jsonl_path and self.is_logging_rank():
            Path(self.jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_train(self, iteration: int, lr, grad_norm, skipped: bool, log: bool) -> None:
        """After iteration `iteration` (every rank): reduce and write on logged iterations."""
        if self.start is None:  # timed from the end of the first iteration (set-up excluded)
            self.start = (time.monotonic(), iteration)
        global _last_logged
        _last_logged = {
            "iteration": iteration,
            "lr": math.nan if lr is None else float(lr),
            "grad_norm": math.nan if grad_norm is None else float(grad_norm),
        }
        sums, self.train = self.train, MetricSums()
        if not log:
            return
        device = collective_device()
        sums.all_reduce(device)
        if not self.is_logging_rank():
            return
        record = {"iteration": iteration, **sums.summary()}
        record.update(
            lr=None if lr is None else float(lr),
            grad_norm=None if grad_norm is None else float(grad_norm),
            skipped=bool(skipped),
        )
        record.update(self.router_losses)
        self.router_losses = {}
        if self.sft_mix is not None:
            record["sft_mix"] = self.sft_mix
        record["p_histogram"] = sums.histogram()
        self._write(record)
        _histogram("train/target_prob", sums, iteration)
        from megatron.training import get_args

        total = get_args().train_iters  # Megatron-LM sets it from --train-samples too
        elapsed = time.monotonic() - self.start[0]
        done = iteration - self.start[1]
        eta = elapsed / done * max(total - iteration, 0) if done else math.nan
        logger.info(
            "[dft] iteration %d/%d | loss %.5f | ce %.4f | p %.3f | entropy %.3f | p<0.01 %.3f | "
            "p>0.99 %.3f | elapsed %s | ETA %s",
            iteration,
            total,
            record["loss"],
            record["ce_loss"],
            record["target_prob_mean"],
            record["entropy"],
            record["p<0.01"],
            record["p>0.99"],
            _hms(elapsed),
            _hms(eta),
        )

    def log_valid(self, iteration: int, full_pass: bool) -> None:
        sums, self.valid = self.valid, MetricSums()
        sums.all_reduce(collective_device())
        if not self.is_logging_rank():
            return
        record = {"iteration": iteration, "split": "valid", "full_pass": full_pass}
        record.update(sums.summary())
        record["p_histogram"] = sums.histogram()
        self._write(record)
        _histogram("valid/target_prob", sums, iteration)


def collective_device() -> torch.device:
    """Where this process's tensors for a collective live: CPU under the CPU bridge or
    without CUDA, else the current CUDA device."""
    from dft_megatron.compat import cpu_bridge_active

    if cpu_bridge_active() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _histogram(tag: str, sums: MetricSums, iteration: int) -> None:
    from megatron.training.global_vars import get_tensorboard_writer

    writer = get_tensorboard_writer()
    counts = sums.histogram()
    total = sum(counts)
    if writer is None or not total:
        return
    centers = [(i + 0.5) / HIST_BINS for i in range(HIST_BINS)]
    writer.add_histogram_raw(
        tag,
        min=0.0,
        max=1.0,
        num=total,
        sum=sum(c * x for c, x in zip(counts, centers, strict=True)),
        sum_squares=sum(c * x * x for c, x in zip(counts, centers, strict=True)),
        bucket_limits=[(i + 1) / HIST_BINS for i in range(HIST_BINS)],
        bucket_counts=counts,
        global_step=iteration,
    )


_hooked: DFTMetrics | None = None
"""The DFTMetrics the hooks installed last write to."""


def _capture_router_losses(report):
    """Megatron-Core's MoE metrics tracker's `report`, which adds each router loss of the
    iteration (`track_names`: load_balancing_loss, z_loss, ...) to `total_loss_dict`; the
    added amounts go to the hooked DFTMetrics as well. What it returns and prints is
    unchanged."""

    @functools.wraps(report)
    def report_to_dft(*args, total_loss_dict=None, track_names=None, **kwargs):
        names = [n for n in track_names or [] if n.lower().endswith("loss")]
        before = {n: float(total_loss_dict[n]) for n in names if n in (total_loss_dict or {})}
        out = report(*args, total_loss_dict=total_loss_dict, track_names=track_names, **kwargs)
        if _hooked is not None and total_loss_dict is not None:
            _hooked.router_losses = {
                n: float(total_loss_dict[n]) - before.get(n, 0.0)
                for n in names
                if n in total_loss_dict
            }
        return out

    report_to_dft.__dft_megatron__ = True
    return report_to_dft


def install_hooks(metrics: DFTMetrics) -> None:
    """Make Megatron-LM's `training_log` and `evaluate_and_print_results` (module functions
    of megatron/training/training.py, called by name from `train` and `pretrain`) also write
    `metrics`, with the MoE router losses that `training_log` reports (from Megatron-Core's
    metrics tracker, which it looks up by name). Their own output is unchanged."""
    global _hooked
    from megatron.training import get_args
    from megatron.training import training as mt

    _hooked = metrics
    get_tracker = getattr(mt.get_moe_metrics_tracker, "__wrapped__", mt.get_moe_metrics_tracker)

    @functools.wraps(get_tracker)
    def get_tracker_reporting_to_dft():
        tracker = get_tracker()
        if not getattr(tracker.report, "__dft_megatron__", False):
            tracker.report = _capture_router_losses(tracker.report)
        return tracker

    mt.get_moe_metrics_tracker = get_tracker_reporting_to_dft

    training_log = getattr(mt.training_log, "__wrapped__", mt.training_log)
    evaluate = getattr(mt.evaluate_and_print_results, "__wrapped__", mt.evaluate_and_print_results)

    @functools.wraps(training_log)
    def training_log_with_dft(loss_dict, total_loss_dict, learning_rate, iteration, *a, **kw):
        out = training_log(loss_dict, total_loss_dict, learning_rate, iteration, *a, **kw)
        skipped = a[2] if len(a) > 2 else kw.get("skipped_iter", 0)
        grad_norm = a[3] if len(a) > 3 else kw.get("grad_norm")
        log = iteration % get_args().log_interval == 0
        metrics.log_train(iteration, learning_rate, grad_norm, bool(skipped), log)
        return out

    @functools.wraps(evaluate)
    def evaluate_with_dft(prefix, forward_step_func, data_iterator, model, iteration, *a, **kw):
        metrics.valid = MetricSums()
        out = evaluate(prefix, forward_step_func, data_iterator, model, iteration, *a, **kw)
        metrics.log_valid(iteration, full_pass=bool(get_args().eval_only))
        return out

    mt.training_log = training_log_with_dft
    mt.evaluate_and_print_results = evaluate_with_dft


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
