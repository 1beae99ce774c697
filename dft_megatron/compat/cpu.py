"""Run unmodified Megatron-Core (0.19.x) on CPU over gloo: tests, CI and a CPU quickstart.

Megatron-Core is written for CUDA. Its local (non-Transformer-Engine) layers compute fine on
CPU, but the code around them asks CUDA for things that a CPU-only process cannot give: it
allocates bookkeeping tensors with ``device="cuda"`` or ``torch.cuda.current_device()``, calls
``torch.cuda.synchronize()``, keeps its dropout RNG streams in CUDA generator state, checks
``param.type() == 'torch.cuda.FloatTensor'`` and moves tensors with ``.cuda()``. Each of these
raises on a machine without a GPU. `install_cpu_bridge` makes them mean "the CPU" instead,
inside Megatron-Core's own code only, and does nothing at all when a GPU is present: the same
code then runs unchanged on GPU.

What is bridged (the numbers of shared/DESIGN.md's list in brackets):

1. ``torch.cuda.current_device()``, ``torch.cuda.synchronize()``, ``torch.cuda.current_stream()``
   and tensors allocated with ``device="cuda"`` [1, 2]. In the Megatron-Core modules listed in
   `_VIEW_MODULES` the module-global name ``torch`` is rebound to `_TorchOnCpu`, a view that
   forwards every attribute to torch except: factory functions (``torch.zeros``,
   ``torch.tensor``, ...) turn a CUDA ``device=`` into the CPU; ``torch.cuda.current_device()``
   is the CPU device; ``synchronize()`` does nothing (CPU ops are synchronous); streams and
   events are torch.cpu's no-op stand-ins; the CUDA RNG calls (``manual_seed``,
   ``get_rng_state``, ``set_rng_state``) act on the CPU generator. This covers the pipeline
   schedules (``total_num_tokens``), p2p shapes and buffers, the optimizers' ``found_inf`` /
   overflow buffers, grad-norm clipping, grad sync, sequence-parallel gathers, GPU-style weight
   init (``use_cpu_initialization=False``), rotary embeddings, the rerun state machine and
   ``dist_checkpointing``'s strategies (torch_dist, fully parallel, mcore async).
2. The RNG tracker (``tensor_parallel/random.py``) [3]. ``_get_cuda_rng_state`` and
   ``_set_cuda_rng_state`` read and set the CPU generator, and ``CudaRNGStatesTracker.fork``
   is `_cpu_fork`: the same save/switch/restore without the "CPU RNG state changed within GPU
   RNG context" warning (on CPU the tracked stream *is* the CPU generator, so it would fire on
   every dropout). ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add`` run
   unchanged through the view of (1). Dropout under ``get_cuda_rng_tracker().fork()``,
   TP-aware weight init and activation recompute work and are reproducible from the seed.
3. ``param.type() == 'torch.cuda.FloatTensor'`` (and Half/BFloat16) in the optimizers [4],
   ``weight.data.cuda()`` in ``LanguageModule.setup_embeddings_and_output_layer`` (tied
   embeddings with PP > 1) [6] and a few other ``.cuda()`` calls. Methods of tensors cannot
   be redirected per module, so the functions in `_TENSOR_METHOD_FUNCTIONS` are wrapped: for
   the duration of the call only, ``Tensor.type()`` names a CPU tensor by its CUDA type and
   ``Tensor.cuda()`` leaves a CPU tensor where it is (`_tensor_methods_on_cpu`). This is the
   one place where torch itself is patched, and only while those calls run.
4. Distributed-optimizer checkpoints in the CPU configuration (fp32 params, torch.optim.AdamW
   since there is no TE or apex): resuming into a fresh optimizer, the Adam step after a
   resume, and "dp_reshardable" loads of fp32 params. These are not about the CPU: a GPU
   without TE and apex needs them too, so they live in `dft_megatron.compat.distrib_optimizer`
   (`install_distributed_optimizer_fixes`, which the trainer calls on every device); the
   bridge applies them as part of itself.
5. Sequence parallelism with the local spec's torch norms, which refuse it without apex
   (`_bridge_torch_norm_sequence_parallel`).
6. The MoE layer: the router's and dispatchers' modules join (1) (the alltoall dispatcher's
   device-to-host copy stream is a `_StreamOnCpu`, whose `record_event` returns an event);
   `moe_utils.maybe_move_tensor_to_cpu` gives numpy split sizes for CPU tensors as it does
   for CUDA ones (`_bridge_moe_host_copies`); uneven token all-gathers and reduce-scatters,
   which gloo refuses, use a padded all-gather and an all-reduce (`_bridge_uneven_gathers`).

Each patch carries a comment naming the Megatron-Core file and function and why.

Checkpoint saves and ``__main__`` [5]. ``dist_checkpointing.save`` collects write results
through a ``multiprocessing`` manager started with the "spawn" method, which re-imports the
``__main__`` module: every entry script that saves checkpoints needs an
``if __name__ == "__main__":`` guard, and ``psutil`` must be installed (a dependency of this
package). Async saves (``async_sharded_save=True``) need ``async_strategy="mcore"`` unless
nvidia-resiliency-ext is installed. Nothing is patched for these; they are rules for scripts.

Not bridged, because it cannot run on CPU at all: Transformer Engine layers and FP8, NCCL,
``torch.autocast("cuda")`` in the schedules (set no ``autocast_dtype`` on CPU), CUDA graphs,
overlapped grad reduce / param gather with several distributed-optimizer instances (CUDA
streams), context parallelism and THD packed sequences (Megatron-Core's local
``DotProductAttention`` refuses both; they need TE).

Switch: `install_cpu_bridge` applies all of this when ``torch.cuda.is_available()`` is false,
when ``force=True`` or when ``DFT_MEGATRON_CPU=1``; otherwise it changes nothing and returns
False. It is idempotent and logs once what it bridged. Importing this module imports torch
only; Megatron-Core is imported when the bridge is installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger(__name__)

ENV_FLAG = "DFT_MEGATRON_CPU"
"""Set to "1" to apply the bridge even where CUDA is available (debugging CPU paths)."""

_active = False
_install_lock = threading.Lock()

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int is how CUDA code names a GPU (e.g. the result of current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu_factory(fn: Callable) -> Callable:
    """`fn` (a torch factory function) with a CUDA `device=` argument replaced by the CPU."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return factory


# Factory functions whose `device=` Megatron-Core sets to "cuda" or torch.cuda.current_device().
_FACTORIES = (
    "arange",
    "as_tensor",
    "empty",
    "empty_like",
    "empty_strided",
    "full",
    "full_like",
    "ones",
    "ones_like",
    "rand",
    "randint",
    "randn",
    "randperm",
    "tensor",
    "zeros",
    "zeros_like",
)


class _StreamOnCpu(torch.cpu.Stream):
    """torch.cpu's no-op stream whose `record_event` returns an event, as a CUDA stream's does
    (the MoE alltoall dispatcher records one on its copy stream and synchronizes it later)."""

    def record_event(self, event=None) -> torch.cpu.Event:
        return event if event is not None else torch.cpu.Event()


_CURRENT_STREAM = _StreamOnCpu()


class _CudaOnCpu(types.ModuleType):
    """Stands in for ``torch.cuda`` inside the bridged Megatron-Core modules.

    Every attribute not defined here is ``torch.cuda``'s own (``is_available()`` stays False).
    """

    def __init__(self) -> None:
        super().__init__("torch.cuda", "torch.cuda as seen by Megatron-Core on CPU")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        # Megatron-Core uses the result as `device=`; the CPU device is a valid value there.
        return _CPU

    @staticmethod
    def synchronize(device=None) -> None:
        # CPU kernels and gloo collectives are synchronous: nothing to wait for.
        return None

    # Streams and events: torch.cpu's stand-ins, whose waits and records do nothing (the
    # grad-sync code asks for torch.cuda.current_stream() to wait on CUDA-graph events).
    @staticmethod
    def current_stream(device=None) -> torch.cpu.Stream:
        return _CURRENT_STREAM

    @staticmethod
    def Stream(device=None, priority: int = 0, **kwargs) -> torch.cpu.Stream:  # noqa: N802
        return _StreamOnCpu()

    @staticmethod
    def Event(*args, **kwargs) -> torch.cpu.Event:  # noqa: N802
        return torch.cpu.Event()

    @staticmethod
    def stream(stream) -> contextlib.AbstractContextManager:
        return torch.cpu.stream(stream)

    # The "CUDA" generator on CPU is the CPU generator (tensor_parallel/random.py reads, seeds
    # and restores it around every forked RNG stream).
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device="cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
        torch.set_rng_state(new_state)


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside the bridged Megatron-Core modules.

    Forwards every attribute to torch except ``torch.cuda`` (`_CudaOnCpu`) and the factory
    functions in `_FACTORIES`, which allocate on the CPU where Megatron-Core asks for CUDA.
    """

    def __init__(self) -> None:
        super().__init__("torch", "torch as seen by Megatron-Core on CPU")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str):
        return getattr(torch, name)


# Megatron-Core modules whose global `torch` becomes `_TorchOnCpu`, and what in them needs it.
_VIEW_MODULES = {
    # schedules: `total_num_tokens = torch.zeros([], device="cuda")` in every schedule.
    "megatron.core.pipeline_parallel.schedules": "device='cuda'",
    # p2p: shape and receive buffers on torch.cuda.current_device(); torch.cuda.synchronize().
    "megatron.core.pipeline_parallel.p2p_communication": "current_device, synchronize",
    # DDP: torch.cuda.synchronize() around grad-buffer offload/reload.
    "megatron.core.distributed.distributed_data_parallel": "synchronize",
    # grad sync: `torch.cuda.current_stream()` (waits on CUDA-graph events) in
    # start_grad_sync, buffers on current_device().
    "megatron.core.distributed.param_and_grad_buffer": "current_stream, current_device",
    # MixedPrecisionOptimizer: found_inf / _dummy_overflow_buf / grad-norm-group flag on 'cuda'.
    "megatron.core.optimizer.optimizer": "device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "current_device",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32: norm buffers on 'cuda'.
    "megatron.core.optimizer.clip_grads": "device='cuda'",
    "megatron.core.optimizer.grad_scaler": "device='cuda' (fp16 loss scaling)",
    # RNG tracker: torch.cuda.manual_seed / get_rng_state in model_parallel_cuda_manual_seed
    # and CudaRNGStatesTracker.add.
    "megatron.core.tensor_parallel.random": "CUDA RNG state",
    # sequence-parallel all-gather / reduce-scatter outputs on current_device().
    "megatron.core.tensor_parallel.mappings": "current_device (sequence parallel)",
    # GPU-style weight init (use_cpu_initialization=False) and SP all-gather buffers.
    "megatron.core.tensor_parallel.layers": "current_device",
    "megatron.core.tensor_parallel.utils": "current_device",
    "megatron.core.tensor_parallel.data": "device='cuda' (broadcast_data)",
    "megatron.core.transformer.utils": "device='cuda' (attention masks)",
    "megatron.core.transformer.attention": "current_device",
    "megatron.core.transformer.dot_product_attention": "current_device",
    "megatron.core.transformer.transformer_layer": "current_device",
    "megatron.core.transformer.module": "current_device",
    "megatron.core.models.gpt.gpt_model": "current_device",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "current_device (RoPE)",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "current_device",
    "megatron.core.rerun_state_machine": "device='cuda' (all-reduced flags)",
    # MoE: the router's expert-bias / token-count buffers on current_device(); the alltoall
    # dispatcher's device-to-host copy stream (torch.cuda.Stream, class attribute).
    "megatron.core.transformer.moe.router": "current_device",
    "megatron.core.transformer.moe.token_dispatcher": "torch.cuda.Stream, current_stream",
    "megatron.core.transformer.moe.moe_layer": "torch.cuda.Event/Stream",
    "megatron.core.transformer.moe.moe_utils": "current_stream",
    "megatron.core.timers": "synchronize, current_device",
    "megatron.core.utils": "current_device, device='cuda'",
    # dist_checkpointing: validation flags on 'cuda', synchronize before/after writes, fully
    # parallel save/load exchange buffers.
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "device='cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize",
    "megatron.core.dist_checkpointing.strategies.async_utils": "synchronize, current_device",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "synchronize",
    "megatron.core.dist_checkpointing.exchange_utils": "device='cuda'",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "synchronize",
}


_tensor_methods_depth = 0
_tensor_methods_lock = threading.Lock()
_ORIG_TENSOR_TYPE = torch.Tensor.type
_ORIG_TENSOR_CUDA = torch.Tensor.cuda


def _type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    # `param.type()` with no argument only names the type; report a CPU tensor as the CUDA
    # type Megatron-Core's checks expect ('torch.FloatTensor' -> 'torch.cuda.FloatTensor').
    if dtype is not None:
        return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    name = _ORIG_TENSOR_TYPE(self)
    return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name


def _cuda_stays_on_cpu(self, device=None, non_blocking=False, memory_format=None):
    return self if self.device.type == "cpu" else self.to(_CPU, non_blocking=non_blocking)


@contextlib.contextmanager
def _tensor_methods_on_cpu() -> Iterator[None]:
    """For the duration: ``Tensor.type()`` names CPU tensors as CUDA types, ``.cuda()`` is a no-op.

    Global while it lasts (tensor methods cannot be rebound per module), so it is entered only
    around the few Megatron-Core functions in `_TENSOR_METHOD_FUNCTIONS`; nested entries nest.
    """
    global _tensor_methods_depth
    with _tensor_methods_lock:
        if _tensor_methods_depth == 0:
            torch.Tensor.type = _type_as_cuda
            torch.Tensor.cuda = _cuda_stays_on_cpu
        _tensor_methods_depth += 1
    try:
        yield
    finally:
        with _tensor_methods_lock:
            _tensor_methods_depth -= 1
            if _tensor_methods_depth == 0:
                torch.Tensor.type = _ORIG_TENSOR_TYPE
                torch.Tensor.cuda = _ORIG_TENSOR_CUDA


# (module, class or None, function): Megatron-Core functions that run under
# `_tensor_methods_on_cpu`, and why.
_TENSOR_METHOD_FUNCTIONS = (
    # `model_param.type() == 'torch.cuda.FloatTensor'` sorts params into fp32/fp16 groups;
    # a CPU param otherwise raises "Wrapped parameters must be one of torch.cuda.FloatTensor".
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        "_build_model_and_main_param_groups",
    ),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    # Checkpointing the distributed optimizer ("fully_reshardable", the default non-gloo
    # exchange): `send_tensor = send_tensor.cuda()` before the all-gather over DP.
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        "get_parameter_state_dp_zero",
    ),
    # `assert param.grad.type() == 'torch.cuda.FloatTensor'` before clipping.
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    # Megatron-LM's get_batch helper: `data[key].cuda()` before the TP broadcast.
    ("megatron.core.tensor_parallel.data", None, "broadcast_data"),
    # Fully parallel checkpoint load (FullyParallelLoadStrategyWrapper): loaded shards are
    # moved with `.cuda()` before they are exchanged over DP.
    (
        "megatron.core.dist_checkpointing.exchange_utils",
        None,
        "exchange_loaded_tensors_gather_rounds",
    ),
    ("megatron.core.dist_checkpointing.exchange_utils", None, "exchange_loaded_tensors_broadcast"),
    # Weight-hash check across DP replicas: `torch.stack(hashes).cuda()`.
    ("megatron.core.utils", None, "check_param_hashes_across_dp_replicas"),
    # Tied embeddings with PP > 1: `weight.data = weight.data.cuda()` before the all-reduce
    # that copies the first stage's embedding into the last stage's output layer.
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule",
        "setup_embeddings_and_output_layer",
    ),
)


def _wrap_tensor_methods(fn: Callable) -> Callable:
    if isinstance(fn, classmethod | staticmethod):
        kind = type(fn)
        return kind(_wrap_tensor_methods(fn.__func__))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_methods_on_cpu():
            return fn(*args, **kwargs)

    wrapper.__dft_megatron_cpu_bridge__ = True
    return wrapper


def _get_cuda_rng_state_cpu(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    """tensor_parallel/random.py `_get_cuda_rng_state` on CPU: the CPU generator's state."""
    return torch.get_rng_state()


def _set_cuda_rng_state_cpu(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    """tensor_parallel/random.py `_set_cuda_rng_state` on CPU: set the CPU generator's state."""
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _cpu_fork(self, name: str | None = None) -> Iterator[None]:
    """``CudaRNGStatesTracker.fork`` on CPU: run the block on the tracked stream `name`.

    Same state machine as Megatron-Core's (save the current stream, switch to `name`, store
    `name`'s advanced state on exit, switch back), minus its check that the CPU generator is
    untouched inside the block: on CPU the tracked stream is the CPU generator.
    """
    if name is None:
        from megatron.core.tensor_parallel import random as mrandom

        name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current state name {self._current_state_name} is not the same as the "
                f"desired state name {name}."
            )
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _bridge_rng() -> str:
    from megatron.core.tensor_parallel import random as mrandom

    # Looked up by name inside random.py (fork, CheckpointFunction, _get/_set_all_rng_states).
    mrandom._get_cuda_rng_state = _get_cuda_rng_state_cpu
    mrandom._set_cuda_rng_state = _set_cuda_rng_state_cpu
    # Class attribute, so trackers created before the bridge (and subclasses) use it too.
    mrandom.CudaRNGStatesTracker.fork = _cpu_fork
    return "tensor_parallel.random: RNG tracker on the CPU generator"


def _bridge_moe_host_copies() -> str:
    """moe_utils.maybe_move_tensor_to_cpu: the alltoall dispatcher copies its split sizes to the
    host `as_numpy` (all_to_all_single takes a sequence of ints, not a tensor), but only a CUDA
    tensor is copied and converted; a CPU one came back a tensor and all_to_all_single refused
    it. On CPU the same conversion is done without the copy."""
    from megatron.core.transformer.moe import moe_utils

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    original = moe_utils.maybe_move_tensor_to_cpu
    _rebind(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    return "moe_utils.maybe_move_tensor_to_cpu: CPU split sizes as numpy (alltoall dispatcher)"


def _bridge_uneven_gathers() -> str:
    """tensor_parallel/mappings.py: the MoE allgather dispatcher (and the alltoall one under TP
    with sequence parallelism) gathers and reduce-scatters token blocks of different sizes
    per rank through `torch.distributed.all_gather` / `reduce_scatter` with tensor lists, which
    gloo refuses ("invalid tensor size"). On CPU the uneven case is done with collectives gloo
    has: the gather pads every block to the largest, all-gathers and drops the padding; the
    reduce-scatter all-reduces the whole input and keeps this rank's block. Same values (the
    sum of the same addends), more traffic, CPU only. The even case is Megatron-Core's own."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = (
        mappings._gather_along_first_dim,
        mappings._reduce_scatter_along_first_dim,
    )

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((rows * group.size(), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[i * rows : i * rows + n] for i, n in enumerate(sizes)])

    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(int(n) for n in input_split_sizes[: group.rank()])
        return total[start : start + int(input_split_sizes[group.rank()])].clone()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    return "tensor_parallel.mappings: uneven all-gather / reduce-scatter with gloo's collectives"


def _bridge_torch_norm_sequence_parallel() -> str:
    """Sequence parallelism with the local spec's torch norms (no apex on CPU).

    transformer/torch_norm.py ``WrappedTorchNorm`` (the local spec's norm without apex) asserts
    ``not config.sequence_parallel`` because it never marks its parameters. Under sequence
    parallelism each TP rank normalizes its own slice of the sequence, so the norm weights
    receive partial gradients that ``finalize_model_grads`` must all-reduce over TP; it does
    that for parameters with ``sequence_parallel = True``, as apex's FusedLayerNorm sets them.
    The bridge builds the torch norm as usual and sets that attribute.
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    new = WrappedTorchNorm.__new__
    if getattr(new, "__dft_megatron__", False):  # applied already (on every device)
        return "WrappedTorchNorm: sequence parallel (params marked for the TP grad all-reduce)"

    @functools.wraps(new)
    def new_with_sequence_parallel(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return new(cls, config, *args, **kwargs)
        config.sequence_parallel = False  # only around the assert; construction is serial
        try:
            norm = new(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    new_with_sequence_parallel.__dft_megatron__ = True
    WrappedTorchNorm.__new__ = new_with_sequence_parallel
    return "WrappedTorchNorm: sequence parallel (params marked for the TP grad all-reduce)"


def _distributed_optimizer_fixes() -> str:
    from dft_megatron.compat import distrib_optimizer

    distrib_optimizer.install_distributed_optimizer_fixes(force=True)
    return distrib_optimizer.summary()


def _bridge_view_modules() -> str:
    view = _TorchOnCpu()
    bridged = []
    for module_name in _VIEW_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # a later Megatron-Core may move or drop a module
            logger.warning("CPU bridge: cannot import %s (%s); not bridged", module_name, err)
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = view
            bridged.append(module_name.removeprefix("megatron.core."))
    return f"torch.cuda/device='cuda' on CPU in {len(bridged)} modules: {', '.join(bridged)}"


def _rebind(module: types.ModuleType, name: str, new) -> None:
    """Set `module.name = new`, and the same in every loaded Megatron-Core module that imported
    the old object by name (``from .clip_grads import clip_grad_by_total_norm_fp32``)."""
    old = getattr(module, name)
    setattr(module, name, new)
    for other_name, other in list(sys.modules.items()):
        if other_name.startswith("megatron.core") and getattr(other, name, None) is old:
            setattr(other, name, new)


def _bridge_tensor_methods() -> str:
    bridged = []
    for module_name, class_name, func_name in _TENSOR_METHOD_FUNCTIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            logger.warning("CPU bridge: cannot import %s (%s); not bridged", module_name, err)
            continue
        if class_name is None:
            _rebind(module, func_name, _wrap_tensor_methods(getattr(module, func_name)))
        else:
            cls = getattr(module, class_name)
            # The raw attribute, so a classmethod stays a classmethod.
            setattr(cls, func_name, _wrap_tensor_methods(cls.__dict__[func_name]))
        bridged.append(f"{class_name + '.' if class_name else ''}{func_name}")
    return f"Tensor.type()/.cuda() on CPU during: {', '.join(bridged)}"


def _wanted(force: bool) -> bool:
    return force or os.environ.get(ENV_FLAG) == "1" or not torch.cuda.is_available()


def install_cpu_bridge(force: bool = False) -> bool:
    """Let unmodified Megatron-Core run on CPU; a no-op on GPU. Returns whether it is active.

    Applies the bridge when there is no CUDA device, when `force` is true or when the
    environment variable ``DFT_MEGATRON_CPU=1``; otherwise changes nothing and returns False.
    Call it before building models (any time before the first Megatron-Core call that would
    touch CUDA); calling it again is a no-op that returns the same answer.
    """
    global _active
    with _install_lock:
        if _active:
            return True
        if not _wanted(force):
            return False
        pieces = [
            _bridge_view_modules(),
            _bridge_rng(),
            _bridge_tensor_methods(),
            _distributed_optimizer_fixes(),
            _bridge_torch_norm_sequence_parallel(),
            _bridge_moe_host_copies(),
            _bridge_uneven_gathers(),
        ]
        _active = True
    logger.info("Megatron-Core CPU bridge installed: %d patch groups (DEBUG: details)", len(pieces))
    logger.debug("Megatron-Core CPU bridge:\n  %s", "\n  ".join(pieces))
    return True


def cpu_bridge_active() -> bool:
    """Whether `install_cpu_bridge` has bridged Megatron-Core to the CPU in this process."""
    return _active


def device() -> torch.device:
    """Where to put tensors for Megatron-Core: the CPU under the bridge, else the current GPU."""
    if _active:
        return _CPU
    return torch.device("cuda", torch.cuda.current_device())
