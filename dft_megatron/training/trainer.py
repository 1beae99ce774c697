"""The training loop on Megatron-Core.

Megatron-Core's lean loop, complete: `initialize_model_parallel` -> GPTModel chunks with the
DFT loss (one per virtual pipeline stage) -> Megatron `DistributedDataParallel` ->
`get_megatron_optimizer` (optionally distributed) -> `OptimizerParamScheduler`; per step
`get_forward_backward_func` (no pipelining, 1F1B or interleaved 1F1B) ->
`finalize_model_grads` -> `optimizer.step()` (grad clipping inside) -> scheduler step.

The loss is a global token mean over loss-masked target tokens: every micro-batch returns
its loss *sum* and token count (Megatron-Core's per-token loss path,
`calculate_per_token_loss=True`), and `finalize_model_grads` divides the gradients by the
token count summed over micro-batches and DP x CP ranks. The result does not depend on
how the global batch is split into micro-batches or ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import unwrap_model

from dft_megatron.compat import install_cpu_bridge, install_distributed_optimizer_fixes
from dft_megatron.data import Batch, GlobalBatchSampler, MockDataset
from dft_megatron.data.packing import block_causal_mask, packed_seq_params
from dft_megatron.data.pretrain import build_pretrain_datasets
from dft_megatron.data.sft import build_sft_datasets, load_tokenizer
from dft_megatron.data.sources import DataError
from dft_megatron.models import build_gpt_model, resolve_transformer_impl, transformer_config
from dft_megatron.models.config import ModelConfig
from dft_megatron.training import checkpointing
from dft_megatron.training.config import ConfigError, TrainConfig
from dft_megatron.training.metrics import MetricsLogger, MetricSums

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ set-up


def initialize_distributed() -> None:
    """Join the process group torchrun describes (env://); a lone process makes a world of 1."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validate(cfg: TrainConfig, world_size: int, on_gpu: bool) -> int:
    """Check the layout against the model and batch; returns the data-parallel size."""
    m, p, o = cfg.model, cfg.parallel, cfg.optim
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    try:
        m.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--context-parallel-size", cp),
    ):
        need(value >= 1, f"{flag} must be >= 1, got {value}")
    need(
        world_size % (tp * pp * cp) == 0,
        f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}; "
        "launch a multiple of that many processes",
    )
    need(
        m.num_attention_heads % tp == 0,
        f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
        f"--tensor-model-parallel-size ({tp})",
    )
    need(
        m.num_query_groups % tp == 0,
        f"--num-query-groups ({m.num_query_groups}) must be divisible by "
        f"--tensor-model-parallel-size ({tp})",
    )
    need(
        m.num_layers % pp == 0,
        f"--num-layers ({m.num_layers}) must be divisible by --pipeline-model-parallel-size ({pp})",
    )
    if p.num_layers_per_virtual_pipeline_stage is not None:
        lps = p.num_layers_per_virtual_pipeline_stage
        need(
            pp > 1,
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
        )
        need(
            lps >= 1 and (m.num_layers // pp) % lps == 0,
            f"--num-layers-per-virtual-pipeline-stage ({lps}) must divide the layers per "
            f"pipeline stage ({m.num_layers} / {pp} = {m.num_layers // pp})",
        )
    need(
        not p.sequence_parallel or tp > 1,
        "--sequence-parallel needs --tensor-model-parallel-size > 1",
    )
    need(
        not p.overlap_param_gather or p.use_distributed_optimizer,
        "--overlap-param-gather needs --use-distributed-optimizer",
    )
    if not on_gpu:
        need(
            cp == 1,
            f"--context-parallel-size {cp} needs Transformer Engine attention on a GPU; "
            "Megatron-Core's local attention (the CPU path) supports context parallel size 1",
        )
        need(
            not (p.overlap_grad_reduce or p.overlap_param_gather),
            "--overlap-grad-reduce / --overlap-param-gather overlap communication on CUDA "
            "streams; drop them on CPU",
        )
    need(
        cp == 1 or m.seq_length % (2 * cp) == 0,
        f"--seq-length ({m.seq_length}) must be divisible by 2 x --context-parallel-size ({cp})",
    )
    need(not (cfg.precision.bf16 and cfg.precision.fp16), "--bf16 and --fp16 exclude each other")
    dp = world_size // (tp * pp * cp)
    gbs = o.global_batch_size if o.global_batch_size is not None else o.micro_batch_size * dp
    need(
        o.micro_batch_size >= 1 and gbs % (o.micro_batch_size * dp) == 0,
        f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size "
        f"({o.micro_batch_size}) x data-parallel size ({dp} = world {world_size} / "
        f"(TP {tp} x PP {pp} x CP {cp}))",
    )
    try:
        # Fixed from here on (and in checkpoints), whatever TP later loads it.
        m.padded_vocab_size = m.embedding_rows(tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(o.train_iters >= 0, f"--train-iters must be >= 0, got {o.train_iters}")
    d = cfg.data
    try:
        d.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(
        d.mock_data or d.sft_data or d.data_path,
        "no training data: give --sft-data FILE (SFT rows), --data-path PREFIX (Megatron "
        "indexed pre-training data) or --mock-data (synthetic tokens)",
    )
    need(
        cp == 1 or not (d.sft_data and d.packing),
        f"packed SFT sequences are not split over context-parallel ranks (--context-parallel-"
        f"size {cp}); pass --no-packing",
    )
    need(
        not (d.sft_data and cfg.logging.eval_interval)
        or d.valid_data
        or d.valid_fraction
        or cfg.logging.eval_only,
        "--eval-interval needs validation data: give --valid-data FILE or --valid-fraction F",
    )
    return dp


def resolve_tokenizer(cfg: TrainConfig, info, given: set[str]):
    """The data's tokenizer: --tokenizer-model, else the one stored with the --load
    checkpoint, else None. Sets the model's --vocab-size from it when nothing else did."""
    d = cfg.data
    if not (d.sft_data or d.data_path):
        return None
    path = d.tokenizer_model
    if path is None and cfg.checkpoint.load is not None:
        path = checkpointing.tokenizer_dir(cfg.checkpoint.load)
    if path is None:
        return None  # pre-tokenized rows need none; other formats say what to give
    tokenizer = load_tokenizer(path, d.chat_template)
    n = len(tokenizer)
    if info is None and "vocab_size" not in given:
        cfg.model.vocab_size = n
    elif n > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer {path} has {n} tokens but the model's vocabulary has "
            f"{cfg.model.vocab_size} (--vocab-size or the checkpoint's); use the model's own "
            "tokenizer"
        )
    return tokenizer


def _rank0_first(build):
    """Run `build` on global rank 0 (which fills the data cache), then on the other ranks
    (which read it); an error on rank 0 stops every rank."""
    if dist.get_world_size() == 1:
        return build()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = build()
        except Exception as e:
            error = e
    failure = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise DataError(f"data preparation failed on rank 0: {failure[0]}")
    return result if dist.get_rank() == 0 else build()


class _Prefix:
    """The first `n` samples of a dataset (periodic validation reads --eval-iters batches)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.dataset[index]


def build_data(cfg: TrainConfig, tokenizer, gbs: int):
    """(training dataset, validation dataset or None, per-epoch shuffle seed or None)."""
    d, m, o, lg = cfg.data, cfg.model, cfg.optim, cfg.logging
    if d.mock_data:
        # Validation: --eval-iters global batches of their own samples (another seed).
        valid = MockDataset(m.vocab_size, m.seq_length, o.seed + 1, size=lg.eval_iters * gbs)
        return MockDataset(m.vocab_size, m.seq_length, o.seed), valid, None
    if d.sft_data:
        train, valid, stats = _rank0_first(
            lambda: build_sft_datasets(
                d, tokenizer, m.seq_length, o.seed, m.vocab_size, eval_only=lg.eval_only
            )
        )
        if dist.get_rank() == 0:
            for line in stats.lines():
                logger.info("SFT data: %s", line)
            if train is not None:
                logger.info(
                    "SFT data: one epoch is %d sequences = %.2f iterations at global batch %d",
                    len(train),
                    len(train) / gbs,
                    gbs,
                )
        return train, valid, o.seed
    # Pre-training data: Megatron-Core's GPTDataset / BlendedMegatronDatasetBuilder (a
    # collective: rank 0 builds the index cache, the others load it).
    if tokenizer is None:
        raise ConfigError(
            "--data-path needs --tokenizer-model (the tokenizer the data was preprocessed "
            "with: its end-of-document id)"
        )
    wants_valid = bool(lg.eval_interval) or lg.eval_only
    try:
        train, valid = build_pretrain_datasets(
            d.data_path,
            d.split,
            m.seq_length,
            o.seed,
            (max(o.train_iters, 1) * gbs, lg.eval_iters * gbs if wants_valid else None),
            tokenizer,
            path_to_cache=d.data_cache_dir,
            eod_mask_loss=d.eod_mask_loss,
        )
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"--data-path: {e}") from None
    if wants_valid and valid is None:
        raise ConfigError(
            f"--split {d.split} leaves no validation documents; give validation a share "
            "(e.g. --split 969,30,1) or drop --eval-interval / --eval-only"
        )
    return train, valid, None


def resolve_model_config(cfg: TrainConfig, given: set[str]) -> checkpointing.CheckpointInfo | None:
    """With --load, take the architecture from the checkpoint; model flags may only agree."""
    if cfg.checkpoint.load is None:
        return None
    info = checkpointing.read_info(checkpointing.resolve(cfg.checkpoint.load))
    stored = info.model
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    overrides = {k: getattr(cfg.model, k) for k in given & model_fields}
    candidate = dataclasses.replace(stored, **overrides)
    conflicts = stored.architecture_differences(candidate)
    if conflicts:
        raise ConfigError(
            f"--load {cfg.checkpoint.load} holds a different architecture than the model flags "
            f"ask for ({'; '.join(conflicts)}); drop those flags (the checkpoint's "
            "architecture is used) or load a matching checkpoint"
        )
    cfg.model = candidate
    return info


def virtual_pipeline_size(cfg: TrainConfig) -> int | None:
    """Model chunks per pipeline rank (the interleaved schedule), or None for plain 1F1B."""
    p = cfg.parallel
    if p.num_layers_per_virtual_pipeline_stage is None:
        return None
    per_stage = cfg.model.num_layers // p.pipeline_model_parallel_size
    return per_stage // p.num_layers_per_virtual_pipeline_stage


def build_model(cfg: TrainConfig, transformer_impl: str) -> list[torch.nn.Module]:
    """This rank's model chunks in Megatron DDP."""
    p = cfg.parallel
    vpp = virtual_pipeline_size(cfg)
    tcfg = transformer_config(
        cfg.model,
        cfg.precision,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        transformer_impl=transformer_impl,
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # fp16's dynamic loss scaling overflows on purpose (the optimizer then skips the step
        # and lowers the scale); everywhere else a NaN gradient stops the run at once.
        check_for_nan_in_grad=not cfg.precision.fp16,
    )
    chunks = []
    for i in range(vpp or 1):
        stage = i if vpp else None
        model = build_gpt_model(
            cfg.model,
            tcfg,
            loss_weighting=cfg.loss,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if cfg.precision.bf16 or cfg.precision.fp16:
            # Casts the first stage's inputs to the parameters' dtype and the last stage's
            # outputs back to fp32 (the per-token loss is fp32 already).
            model = Float16Module(tcfg, model)
        chunks.append(
            DistributedDataParallel(
                config=tcfg,
                ddp_config=ddp_config,
                module=model,
                # Megatron-LM: only the first chunk's bucket reduction may not overlap.
                disable_bucketing=i > 0,
            )
        )
    tcfg.finalize_model_grads_func = finalize_model_grads
    if p.overlap_grad_reduce:
        tcfg.no_sync_func = [c.no_sync for c in chunks]
        if len(chunks) == 1:
            tcfg.no_sync_func = tcfg.no_sync_func[0]
    if p.overlap_param_gather:
        tcfg.param_sync_func = [c.start_param_sync for c in chunks]
        if len(chunks) == 1:
            tcfg.param_sync_func = tcfg.param_sync_func[0]
    return chunks


def build_optimizer(cfg: TrainConfig, model: list[torch.nn.Module]):
    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.precision.bf16,
        fp16=cfg.precision.fp16,
        params_dtype=cfg.precision.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    # The schedules multiply each micro-batch's loss by this before backward: fp16's dynamic
    # loss scale (1.0 for bf16/fp32), which the optimizer divides out again.
    unwrap_model(model[0]).config.grad_scale_func = optimizer.scale_loss
    warmup = o.lr_warmup_iters
    if o.lr_warmup_fraction is not None:
        warmup = int(o.lr_warmup_fraction * o.train_iters)
    if o.train_iters and warmup >= o.train_iters:
        raise ConfigError(
            f"the LR warm-up ({warmup} iterations) must be shorter than --train-iters "
            f"({o.train_iters}); lower --lr-warmup-iters or use --lr-warmup-fraction"
        )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(o.train_iters, 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(o.train_iters, 1),
        wd_incr_style="constant",
        # On resume the schedule comes from the flags (lr, warm-up, --train-iters), the step
        # count from the checkpoint: a run resumed with a longer --train-iters stretches it.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


# ------------------------------------------------------------------ one step


def _loss_func(batch: Batch, chunk, sums: MetricSums, output_tensor):
    """Micro-batch loss sum and token count (Megatron's per-token path), metrics on the side.
    A sample weight scales its tokens' losses; the count is of target tokens."""
    loss_mask = batch.loss_mask.float()
    loss = output_tensor.float()
    if batch.loss_weight is not None:
        loss = loss * batch.loss_weight
    loss_sum = (loss * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    sums.add(loss, unwrap_model(chunk).last_loss_stats, loss_mask)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach()}


def _forward_step(device, sums, data_iterator, model):
    batch = next(data_iterator).to(device)
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = batch.on_context_parallel_rank(parallel_state.get_context_parallel_group())
    attention_mask, packed = None, None
    if batch.segment_ids is not None:  # packed samples: attention stays inside each
        if unwrap_model(model).config.transformer_impl == "transformer_engine":
            packed = packed_seq_params(batch.segment_ids)
        else:
            attention_mask = block_causal_mask(batch.segment_ids)
    output = model(
        batch.tokens,
        batch.position_ids,
        attention_mask,
        labels=batch.labels,
        packed_seq_params=packed,
    )  # [b, s] per-token loss on the last stage
    return output, partial(_loss_func, batch, model, sums)


def run_microbatches(
    model, batches, device, *, forward_only: bool, collect_stats: bool = True
) -> MetricSums:
    """Forward (and backward) of `batches` through the pipeline; the step's global metrics
    (only the loss and token count unless `collect_stats`)."""
    for chunk in model:
        unwrap_model(chunk).collect_stats = collect_stats
    sums = MetricSums()
    n = len(batches)
    iterators = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    get_forward_backward_func()(
        forward_step_func=partial(_forward_step, device, sums),
        data_iterator=iterators,
        model=model,
        num_microbatches=n,
        seq_length=batches[0].tokens.shape[1],
        micro_batch_size=batches[0].tokens.shape[0],
        forward_only=forward_only,
    )
    # Last-stage TP rank 0 of every DP/CP rank holds its share; everyone else adds zeros.
    if not (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        sums = MetricSums()
    sums.all_reduce(device)
    return sums


def train_step(model, optimizer, scheduler, batches, device, *, collect_stats: bool):
    """One optimizer step on this rank's micro-batches of a global batch.

    Returns (global metrics, learning rate used, grad norm or None, whether the update was
    applied; False: skipped for a gradient overflow under fp16 loss scaling).
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    sums = run_microbatches(model, batches, device, forward_only=False, collect_stats=collect_stats)
    lr = optimizer.param_groups[0]["lr"]  # this step's; the scheduler moves it on
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return sums, lr, None if grad_norm is None else float(grad_norm), ok


# ------------------------------------------------------------------ the run


def train(cfg: TrainConfig, given: set[str] | None = None) -> list[dict]:
    """Run the configured training (or --eval-only); returns the logged records."""
    given = given or set()
    install_cpu_bridge()
    # Megatron-Core's distributed optimizer on torch AdamW (no TE/apex: CPU, or a GPU without
    # them) cannot resume from its own checkpoints unpatched; a no-op with TE or apex.
    install_distributed_optimizer_fixes()
    initialize_distributed()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    info = resolve_model_config(cfg, given)
    tokenizer = resolve_tokenizer(cfg, info, given)
    dp = validate(cfg, dist.get_world_size(), on_gpu)
    transformer_impl = resolve_transformer_impl(cfg.precision)
    p, o = cfg.parallel, cfg.optim
    gbs = o.global_batch_size or o.micro_batch_size * dp
    thd = cfg.data.sft_data and cfg.data.packing and transformer_impl == "transformer_engine"
    if thd and o.micro_batch_size != 1:
        raise ConfigError(
            "packed SFT sequences on Transformer Engine (THD) take --micro-batch-size 1 "
            f"(got {o.micro_batch_size}); keep --global-batch-size, or pass --no-packing"
        )
    data = build_data(cfg, tokenizer, gbs)
    if o.train_epochs is not None:
        if not cfg.data.sft_data or data[0] is None:
            raise ConfigError(
                "--train-epochs needs --sft-data (for --data-path, --train-iters sets how many "
                "samples are built)"
            )
        o.train_iters = math.ceil(o.train_epochs * len(data[0]) / gbs)
        logger.info(
            "--train-epochs %g: %d iterations of %d sequences", o.train_epochs, o.train_iters, gbs
        )

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(cfg),
        context_parallel_size=p.context_parallel_size,
    )
    try:
        return _run(cfg, info, device, dp, gbs, transformer_impl, data, tokenizer)
    finally:
        parallel_state.destroy_model_parallel()


def _run(cfg, info, device, dp, gbs, transformer_impl, data, tokenizer) -> list[dict]:
    o, ck, lg = cfg.optim, cfg.checkpoint, cfg.logging
    # Megatron-LM's seeding: distinct per pipeline stage; the tracker seeds TP streams.
    torch.manual_seed(o.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(o.seed)
    logger.info(
        "model %s: %d layers, hidden %d, %d heads (%d query groups), vocab %d (padded %d); "
        "TP %d x PP %d x CP %d x DP %d, %s layers, loss %s",
        cfg.model.family,
        cfg.model.num_layers,
        cfg.model.hidden_size,
        cfg.model.num_attention_heads,
        cfg.model.num_query_groups,
        cfg.model.vocab_size,
        cfg.model.padded_vocab_size,
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.parallel.context_parallel_size,
        dp,
        transformer_impl,
        cfg.loss,
    )
    model = build_model(cfg, transformer_impl)
    optimizer, scheduler = (None, None) if lg.eval_only else build_optimizer(cfg, model)

    iteration, consumed = 0, 0
    if info is not None:
        weights_only = ck.finetune or lg.eval_only
        checkpointing.load_checkpoint(
            info,
            model,
            None if weights_only or ck.no_load_optim else optimizer,
            None if weights_only or ck.no_load_optim else scheduler,
            load_rng=not (weights_only or ck.no_load_rng),
        )
        if not weights_only:
            iteration, consumed = info.iteration, info.consumed_samples
            if ck.no_load_optim and scheduler is not None:
                # A fresh scheduler continues the schedule from the loaded iteration.
                scheduler.step(increment=iteration)
        elif lg.eval_only:
            # Label the validation line with the iteration of the weights it evaluates.
            iteration = info.iteration

    dp_rank = parallel_state.get_data_parallel_rank()
    m = cfg.model
    metrics = MetricsLogger(o.train_iters, lg.tensorboard_dir, lg.log_metrics_jsonl)
    records = []
    train_set, valid, shuffle_seed = data
    if ck.save and tokenizer is not None and dist.get_rank() == 0:
        checkpointing.save_tokenizer(ck.save, tokenizer)
    try:
        if lg.eval_only:
            sums = evaluate(model, valid, gbs, o.micro_batch_size, dp_rank, dp, device)
            records.append(metrics.log_eval(iteration, sums, full_pass=True))
            return records

        if valid is not None:
            valid = _Prefix(valid, lg.eval_iters * gbs)
        train_data = GlobalBatchSampler(
            train_set,
            gbs,
            o.micro_batch_size,
            dp_rank,
            dp,
            consumed_samples=consumed,
            shuffle_seed=shuffle_seed,
        )
        start_iteration = iteration
        saved = False  # whether the latest iteration is already on disk
        while iteration < o.train_iters:
            batches = train_data.next_global_batch()
            t0 = time.perf_counter()
            logged = (iteration + 1) % lg.log_interval == 0 or iteration + 1 == o.train_iters
            sums, lr, grad_norm, ok = train_step(
                model, optimizer, scheduler, batches, device, collect_stats=logged
            )
            step_s = time.perf_counter() - t0
            iteration += 1
            summary = sums.summary()
            if not math.isfinite(summary["loss"]) and summary["tokens"] > 0:
                raise FloatingPointError(
                    f"iteration {iteration}: the loss is {summary['loss']} (NaN/Inf); lower "
                    "--lr, check the data, or use --bf16 instead of --fp16"
                )
            if not ok:
                logger.warning("iteration %d: skipped (gradient overflow)", iteration)
            if logged:
                records.append(
                    metrics.log_train(
                        iteration,
                        sums,
                        lr=lr,
                        grad_norm=grad_norm,
                        step_seconds=step_s,
                        tokens_per_step=gbs * m.seq_length,
                        iters_done_this_run=iteration - start_iteration,
                    )
                )
            if lg.eval_interval and iteration % lg.eval_interval == 0:
                sums = evaluate(model, valid, gbs, o.micro_batch_size, dp_rank, dp, device)
                records.append(metrics.log_eval(iteration, sums, full_pass=False))
            saved = bool(ck.save and ck.save_interval and iteration % ck.save_interval == 0)
            if saved:
                _save(cfg, iteration, train_data.consumed_samples, model, optimizer, scheduler)
            if ck.exit_interval and iteration % ck.exit_interval == 0:
                logger.info(
                    "exiting at iteration %d (--exit-interval %d)", iteration, ck.exit_interval
                )
                break
        if ck.save and not saved:
            _save(cfg, iteration, train_data.consumed_samples, model, optimizer, scheduler)
        return records
    finally:
        metrics.close()


def _save(cfg, iteration, consumed, model, optimizer, scheduler):
    overlap = cfg.parallel.overlap_param_gather
    if overlap:
        # With overlapped param gather the step leaves the all-gather of updated parameters
        # to the next forward; finish it first so the save holds the new weights everywhere.
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
    checkpointing.save_checkpoint(
        cfg.checkpoint.save,
        iteration,
        consumed,
        model,
        optimizer,
        scheduler,
        cfg.model,
        cfg.to_dict(),
    )
    if overlap:
        for chunk in model:
            chunk.enable_forward_pre_hook()


def evaluate(model, dataset, gbs, mbs, dp_rank, dp, device) -> MetricSums:
    """One pass over `dataset` in eval mode: every sample once (a short last batch is padded
    with samples that carry no loss)."""
    total = MetricSums()
    for chunk in model:
        chunk.eval()
    sampler = GlobalBatchSampler(dataset, gbs, mbs, dp_rank, dp, wrap=False)
    try:
        with torch.no_grad():
            for _ in range(-(-len(dataset) // gbs)):
                batches = sampler.next_global_batch()
                total.values += run_microbatches(model, batches, device, forward_only=True).values
    finally:
        for chunk in model:
            chunk.train()
    return total
