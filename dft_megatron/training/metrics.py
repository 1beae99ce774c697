"""Per-step training metrics: reduced over ranks, logged to console, TensorBoard and JSON lines.

Every micro-batch's loss function (on the last pipeline stage) adds masked sums to a
`MetricSums`; after the step one SUM all-reduce over the whole world (non-contributing
ranks add zeros) gives every rank the global numbers, so rank 0 can log them. Nothing
here holds per-token tensors past the micro-batch.

Target-probability regimes: the fractions of target tokens with p < 0.01, 0.01-0.5,
0.5-0.99 and > 0.99 show whether DFT's base model puts mass on the targets (DFT
polarizes p: tokens it cannot learn sink below 0.01); the histogram (20 equal bins over
[0, 1]) is the paper's Figure 2 view.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

REGIME_EDGES = (0.01, 0.5, 0.99)
REGIME_NAMES = ("p_lt_0.01", "p_0.01_0.5", "p_0.5_0.99", "p_gt_0.99")
HIST_BINS = 20
_SCALARS = ("loss", "ce_loss", "target_prob", "entropy", "tokens")
_WIDTH = len(_SCALARS) + len(REGIME_NAMES) + HIST_BINS


class MetricSums:
    """Masked sums over target tokens, accumulated over micro-batches, as one fp64 vector."""

    def __init__(self):
        self.values = torch.zeros(_WIDTH, dtype=torch.float64)

    def add(self, loss, stats, mask) -> None:
        """loss, stats fields and mask: [b, s]; mask 1.0 on target tokens. Without stats
        (None: a step that is not logged) only the loss sum and the token count."""
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
                        stats.entropy[m].double().sum(),
                        p.new_tensor(float(p.numel())),
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
        regimes = v[5 : 5 + len(REGIME_NAMES)]
        out.update({name: mean(c) for name, c in zip(REGIME_NAMES, regimes, strict=True)})
        return out

    def histogram(self) -> list[float]:
        return self.values[5 + len(REGIME_NAMES) :].tolist()


class MetricsLogger:
    """Console lines, TensorBoard and JSON lines; writes on global rank 0 only."""

    def __init__(self, total_iters: int, tensorboard_dir: str | None, jsonl_path: str | None):
        self.total_iters = total_iters
        self.enabled = dist.get_rank() == 0
        self.start = time.monotonic()
        self.writer = None
        self.jsonl = None
        if not self.enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl_path, "a")  # noqa: SIM115 (closed in close())

    def log_train(
        self,
        iteration: int,
        sums: MetricSums,
        *,
        lr: float,
        grad_norm: float | None,
        step_seconds: float,
        tokens_per_step: int,
        iters_done_this_run: int,
    ) -> dict:
        record = {"iteration": iteration, **sums.summary()}
        record.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_step / step_seconds if step_seconds > 0 else math.nan,
            step_s=step_seconds,
        )
        if not self.enabled:
            return record
        elapsed = time.monotonic() - self.start
        remaining = self.total_iters - iteration
        eta = elapsed / max(iters_done_this_run, 1) * remaining
        gn = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        logger.info(
            "iteration %d/%d | loss %.5f | ce %.4f | p %.3f | entropy %.3f | lr %.3e | "
            "grad norm %s | %.0f tokens/s | elapsed %s | ETA %s",
            iteration,
            self.total_iters,
            record["loss"],
            record["ce_loss"],
            record["target_prob_mean"],
            record["entropy"],
            lr,
            gn,
            record["tokens_per_s"],
            _hms(elapsed),
            _hms(eta),
        )
        if self.writer is not None:
            for key in ("loss", "ce_loss", "target_prob_mean", "entropy", *REGIME_NAMES):
                self.writer.add_scalar(f"train/{key}", record[key], iteration)
            self.writer.add_scalar("train/lr", lr, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, iteration)
            self.writer.add_scalar("train/tokens_per_s", record["tokens_per_s"], iteration)
            self._histogram("train/target_prob", sums, iteration)
        self._write_jsonl(record)
        return record

    def log_eval(self, iteration: int, sums: MetricSums, *, full_pass: bool) -> dict:
        record = {"iteration": iteration, "split": "valid", "full_pass": full_pass}
        record.update(sums.summary())
        if not self.enabled:
            return record
        logger.info(
            "validation at iteration %d | loss %.5f | ce %.4f | p %.3f | %d tokens",
            iteration,
            record["loss"],
            record["ce_loss"],
            record["target_prob_mean"],
            record["tokens"],
        )
        if self.writer is not None:
            for key in ("loss", "ce_loss", "target_prob_mean", *REGIME_NAMES):
                self.writer.add_scalar(f"valid/{key}", record[key], iteration)
            self._histogram("valid/target_prob", sums, iteration)
        self._write_jsonl(record)
        return record

    def _histogram(self, tag: str, sums: MetricSums, iteration: int) -> None:
        counts = sums.histogram()
        total = sum(counts)
        if not total:
            return
        centers = [(i + 0.5) / HIST_BINS for i in range(HIST_BINS)]
        self.writer.add_histogram_raw(
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

    def _write_jsonl(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
