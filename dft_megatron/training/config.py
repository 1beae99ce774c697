"""Training configuration: one dataclass per concern, filled from Megatron-LM style flags.

The model's architecture is `dft_megatron.models.ModelConfig`, precision is
`dft_megatron.models.PrecisionConfig` and the loss is `dft_megatron.loss.TokenWeighting`;
this module adds parallelism, optimization, checkpointing, logging and data, and
`TrainConfig` holds them all. Cross-concern checks (divisibility by the layout) live in
`TrainConfig.validate`, which names the flag to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dft_megatron.data.config import DataConfig
from dft_megatron.loss import TokenWeighting
from dft_megatron.models.config import ModelConfig
from dft_megatron.models.gpt import PrecisionConfig


class ConfigError(ValueError):
    """A flag combination that cannot run; the message names the flag and the fix."""


@dataclass
class ParallelConfig:
    """How the model and the batch are split; data parallel size follows from the world."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer (heads, MLP columns, vocabulary)."""

    pipeline_model_parallel_size: int = 1
    """Pipeline stages (contiguous groups of layers)."""

    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual stage: the interleaved 1F1B schedule; None: plain 1F1B."""

    context_parallel_size: int = 1
    """Ranks that split the sequence inside attention (needs TE attention: GPU only)."""

    sequence_parallel: bool = False
    """Split the non-tensor-parallel activations along the sequence over TP ranks."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward."""


@dataclass
class OptimConfig:
    """Batch, schedule and AdamW; Megatron-LM's names and meanings."""

    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""

    global_batch_size: int | None = None
    """Sequences per optimizer step over all DP ranks; None: micro_batch_size x DP."""

    train_iters: int = 10
    """Optimizer steps."""

    train_epochs: float | None = None
    """Train this many passes over the training data instead of --train-iters (which is then
    set from the data: ceil(epochs x sequences / global batch size))."""

    lr: float = 1e-4
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    lr_decay_style: str = "cosine"
    """"constant", "linear" or "cosine"."""

    lr_warmup_fraction: float | None = None
    """Warm-up length as a fraction of train_iters (the paper: 0.1); overrides lr_warmup_iters."""

    lr_warmup_iters: int = 0
    """Warm-up length in steps (linear from 0)."""

    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2 (the paper: 0.95)."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    seed: int = 1234
    """Seed of initialization, dropout and mock data."""


@dataclass
class CheckpointConfig:
    """Where checkpoints go and what is restored."""

    save: str | None = None
    """Checkpoint directory to write (iter_NNNNNNN/ folders, latest_checkpointed_iteration.txt)."""

    load: str | None = None
    """Checkpoint directory (or one iter_NNNNNNN folder) to start from."""

    save_interval: int | None = None
    """Save every N iterations (and always at the end when --save is given)."""

    exit_interval: int | None = None
    """Stop after the first iteration divisible by this (saving first, with --save); the
    schedule still spans --train-iters, so a later --load continues it."""

    finetune: bool = False
    """Load weights only: iteration, optimizer, scheduler and consumed samples start fresh."""

    no_load_optim: bool = False
    """Do not restore optimizer and scheduler state."""

    no_load_rng: bool = False
    """Do not restore RNG states."""


@dataclass
class LoggingConfig:
    """Console, TensorBoard, JSON lines and evaluation."""

    log_interval: int = 1
    """Log every N iterations."""

    tensorboard_dir: str | None = None
    """Write TensorBoard scalars and the target-probability histogram here."""

    log_metrics_jsonl: str | None = None
    """Append one JSON object per logged iteration to this file."""

    eval_interval: int | None = None
    """Evaluate on the validation data every N iterations; None: never during training."""

    eval_iters: int = 1
    """Validation batches per evaluation (--eval-only reads the whole validation set)."""

    eval_only: bool = False
    """No training: one full pass over the validation data, logged as one JSON line at the
    loaded checkpoint's iteration."""


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: TokenWeighting = field(default_factory=TokenWeighting)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
