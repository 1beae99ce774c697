"""A tiny GPTModel trained through Megatron-Core's own machinery, for the CPU bridge tests.

Everything here runs inside a gloo rank started by `tests.dist.spawn` and follows Megatron-Core's
lean loop: `initialize_model_parallel` -> GPTModel (local layer spec) -> Megatron
`DistributedDataParallel` -> `get_megatron_optimizer` (distributed optimizer) ->
`get_forward_backward_func` -> `finalize_model_grads` -> `optimizer.step()`.

The model: 2 layers (4 for the interleaved schedule), hidden 64, 4 heads, vocab 128, sequence
16, tied input/output embeddings, learned absolute positions, fp32. One global batch of
`GLOBAL_BATCH` sequences is cut the same way at every layout: DP rank r takes the r-th
contiguous slice and splits it into micro-batches, so the token-mean loss (and its gradient) is
the same at every TP x PP (x VP) x DP layout. Checkpoints go through `dist_checkpointing` the
way Megatron-LM writes them (torch_dist in the fully parallel wrappers, optionally async).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import unwrap_model

from dft_megatron.compat import device, install_cpu_bridge

GLOBAL_BATCH = 4
"""Sequences per optimizer step, at every layout."""


@dataclasses.dataclass(frozen=True)
class Tiny:
    """Sizes and switches of the test model."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    vocab_size: int = 128
    seq_length: int = 16
    dropout: float = 0.0
    """Attention and hidden dropout; 0 so that losses compare across layouts."""
    sequence_parallel: bool = False
    use_cpu_initialization: bool = True
    """False: Megatron's GPU-style init, each TP rank draws its shard from the tracker's
    tensor-parallel RNG stream (on the CPU generator under the bridge)."""
    recompute: bool = False
    """Full activation recompute of every layer (replays dropout from saved RNG states)."""


TINY = Tiny()
DEEP = Tiny(num_layers=4)
"""4 layers: PP2 x VP2 (the interleaved schedule) gets one layer per virtual stage."""


def init_parallel(tp: int, pp: int, seed: int, vp: int | None = None) -> None:
    """Bridge Megatron-Core to CPU, (re)build the TP x PP (x VP) x DP groups and seed every RNG."""
    install_cpu_bridge()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
    )
    reseed(seed)


def reseed(seed: int) -> None:
    """Megatron-LM's seeding: the default generator, then the tracker's named streams."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build_model(sizes: Tiny = TINY, *, ddp: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), in Megatron DDP if `ddp`."""
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    recompute = {}
    if sizes.recompute:
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    config = TransformerConfig(
        num_layers=sizes.num_layers,
        hidden_size=sizes.hidden_size,
        num_attention_heads=sizes.num_attention_heads,
        hidden_dropout=sizes.dropout,
        attention_dropout=sizes.dropout,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vp,
        sequence_parallel=sizes.sequence_parallel,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=sizes.use_cpu_initialization,
        **recompute,
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True
    )
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=sizes.vocab_size,
            max_sequence_length=sizes.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            share_embeddings_and_output_weights=True,
            vp_stage=stage,
        )
        if ddp:
            model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        chunks.append(model)
    return chunks


def build_optimizer(model: list[torch.nn.Module], lr: float = 1e-2):
    """Megatron's distributed Adam over `model`'s chunks, sharded over the DP group."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        use_distributed_optimizer=True,
    )
    return get_megatron_optimizer(config, model)


def global_batch(seed: int, sizes: Tiny = TINY) -> torch.Tensor:
    """[GLOBAL_BATCH, s + 1] random token ids, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, sizes.vocab_size, (GLOBAL_BATCH, sizes.seq_length + 1), generator=gen)


def micro_batches(tokens: torch.Tensor, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's slice of the global batch, cut into micro-batches of inputs and labels."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    local = tokens.chunk(dp_size)[dp_rank]
    return [{"tokens": mb[:, :-1], "labels": mb[:, 1:]} for mb in local.split(micro_batch_size)]


def _loss_func(output_tensor: torch.Tensor):
    # output_tensor: [b, s] per-token CE from GPTModel -> token mean over the micro-batch.
    loss = output_tensor.float().mean()
    # clone: the schedule divides the returned loss in place by the number of micro-batches.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens = batch["tokens"].to(device())
    labels = batch["labels"].to(device())
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device()).unsqueeze(0).expand(b, s)
    # The local DotProductAttention applies its causal mask itself: no attention_mask needed.
    return model(tokens, position_ids, None, labels=labels), _loss_func


def run_batches(model: list[torch.nn.Module], batches, *, forward_only: bool) -> float:
    """Forward (and backward) of this rank's micro-batches; the global token-mean loss, on
    every rank (averaged over DP, sent from the last pipeline stage)."""
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=_forward_step,
        # The interleaved schedule wants one iterator per model chunk.
        data_iterator=iter(batches) if len(model) == 1 else [iter(batches) for _ in model],
        model=model,
        num_microbatches=len(batches),
        seq_length=batches[0]["tokens"].shape[1],
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    local = torch.zeros((), dtype=torch.float64)
    sender = parallel_state.get_tensor_model_parallel_rank() == 0
    if parallel_state.is_pipeline_last_stage() and sender:
        local += sum(d["lm loss"].double() for d in losses) / len(losses)
    dist.all_reduce(local)
    return local.item() / parallel_state.get_data_parallel_world_size()


def train_step(model, optimizer, batches) -> float:
    """One optimizer step on `batches`; the global loss before the step."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = run_batches(model, batches, forward_only=False)
    finalize_model_grads(model)
    update_successful, _, _ = optimizer.step()
    assert update_successful
    return loss


def evaluate(model, batches) -> float:
    """The global loss of `batches` in eval mode (no dropout, no gradients)."""
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        loss = run_batches(model, batches, forward_only=True)
    for chunk in model:
        chunk.train()
    return loss


# Distributed-optimizer checkpoint formats. Megatron-Core 0.19's default,
# "fully_sharded_model_space", builds ShardedTensors with `flattened_range`, which its own
# dist_checkpointing then rejects. "fully_reshardable" reshards across TP, PP and DP but, in
# 0.19.2, saves wrong state for every param past the first bucket of a grad buffer when buckets
# carry end padding (fixed upstream by Megatron-LM PR #5077): the tied embedding gets its own
# bucket at PP > 1, so only single-bucket or unpadded (DP1 at these sizes) layouts may save in
# it. "dp_reshardable" keeps the TP x PP layout and reshards DP only.
RESHARDABLE = "fully_reshardable"
DP_RESHARDABLE = "dp_reshardable"


def _model_state(model) -> dict:
    # One entry per chunk; dist_checkpointing matches tensors by their global keys (layer
    # numbers include the pipeline offset), so any layout loads any other.
    chunks = unwrap_model(model)
    return {f"model{i}": chunk.sharded_state_dict(prefix="") for i, chunk in enumerate(chunks)}


def save_checkpoint(
    model, optimizer, path, *, async_save: bool = False, optimizer_format: str = RESHARDABLE
) -> None:
    """Model (and optimizer, if given) state through `dist_checkpointing`, reshardable.

    As Megatron-LM saves: the torch_dist strategy in the fully parallel wrapper (each DP
    replica writes a share); `async_save` writes from a forked process through Megatron-Core's
    own async queue ("mcore" strategy; "nvrx" would need nvidia-resiliency-ext) and waits.
    """
    if dist.get_rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)  # save() wants an existing, empty folder
    dist.barrier()
    state = _model_state(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), metadata={"distrib_optim_sharding_type": optimizer_format}
        )
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    if not async_save:
        dist_checkpointing.save(state, str(path), strategy)
        return
    request = dist_checkpointing.save(
        state, str(path), strategy, async_sharded_save=True, async_strategy="mcore"
    )
    queue = AsyncCallsQueue()
    queue.schedule_async_request(request)
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()


def load_checkpoint(model, optimizer, path, *, optimizer_format: str = RESHARDABLE) -> None:
    """Load what `save_checkpoint` wrote, at this rank's layout; the optimizer if given."""
    state = _model_state(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state),
            is_loading=True,
            metadata={"distrib_optim_sharding_type": optimizer_format},
        )
    strategy = FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(path)),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    loaded = dist_checkpointing.load(state, str(path), strategy)
    for i, chunk in enumerate(model):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
