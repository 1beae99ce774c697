"""Run Megatron-LM's own trainer (`megatron.training`, shipped in the megatron-core wheel) as
it is, on CPU over gloo and with the wheel as installed.

`install_megatron_training_fixes()` applies what every device needs (a no-op where the thing
it fixes is absent); `install_megatron_training_cpu_bridge()` applies the CPU part on top of
`dft_megatron.compat.cpu.install_cpu_bridge` and does nothing where a GPU is present. Each
piece below is one function, named after the assumption it bridges, with the Megatron-LM
file and function it touches; tests/compat/test_megatron_training_bridge.py checks each one.

Every device (`install_megatron_training_fixes`):

- the torch norm of the local layer spec under --sequence-parallel
  (`compat.cpu._bridge_torch_norm_sequence_parallel`): it asserts without apex, which is
  the case on a GPU without TE or apex as on CPU.
- `_fix_compile_helpers`: `megatron/training/initialize.py:_compile_dependencies` calls
  `megatron.core.datasets.utils.compile_helpers`, which runs ``make`` inside site-packages.
  The wheel ships the compiled extension (``helpers_cpp``) but no Makefile, so ``make`` fails
  and `compile_helpers` calls ``sys.exit(1)``. The fix keeps the build where the extension is
  missing (a source checkout) and skips it where it imports.

CPU only (`install_megatron_training_cpu_bridge`):

1. `_bridge_allow_no_cuda`: `initialize_megatron` asserts CUDA unless ``allow_no_cuda=True``,
   which `pretrain` never passes.
2. `_bridge_device_count`: in initialize.py, ``torch.cuda.device_count() > 0`` gates
   `initialize_model_parallel` and `model_parallel_cuda_manual_seed`; on CPU both would be
   skipped and the first use of a parallel group fails. The module sees one "device";
   ``torch.cuda.set_device`` is a no-op there.
3. `_bridge_jit_warmup`: `set_jit_fusion_options` warms up bias-GeLU / bias-dropout-add
   fusions on random CUDA tensors. On CPU they are switched off, and the warm-up's random
   draws (whose sizes depend on TP) would shift the seeded weight init between layouts; it is
   skipped.
4. `_bridge_view_modules`: ``device='cuda'`` tensors and ``torch.cuda.*`` calls in
   training.py (pretrain, train_step, training_log, evaluate, exit-duration checks, streams in
   get_model), training/utils, checkpointing.py (RNG state, `read_metadata`) and the signal
   handler: the module-global ``torch`` becomes the CPU view of `compat.cpu`.
5. `_bridge_get_model`: `get_model` moves every chunk with ``module.cuda(...)``; it runs with
   ``Tensor.cuda()`` leaving CPU tensors in place.
6. `_bridge_device_arch`: `validate_args` asks `get_device_arch_version()` (the GPU's compute
   capability) when TP or CP > 1; on CPU there is none (0), and the
   CUDA_DEVICE_MAX_CONNECTIONS advice it then gives is about CUDA streams, so the variable is
   set for the process.
7. `_bridge_data_loader`: exact resume with dropout. The data loader's iterator draws its
   base seed from the default generator; on CPU that is also the dropout stream (on a GPU
   dropout draws from the CUDA generator), so a resumed run, which builds its iterator after
   restoring the RNG, shifts every later dropout mask. Each loader built by
   `build_pretraining_data_loader` gets a generator of its own, seeded from ``--seed``, and
   no ``pin_memory`` (it needs CUDA; torch warns once per loader).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading

import torch

from dft_megatron.compat import cpu

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_fixes_applied = False
_cpu_applied = False


# ------------------------------------------------------------------ every device


def _fix_compile_helpers() -> str:
    from megatron.core.datasets import utils as dutils

    original = dutils.compile_helpers
    if getattr(original, "__dft_megatron__", False):
        return "compile_helpers: already fixed"

    @functools.wraps(original)
    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            return original()  # a source checkout: build them as Megatron-LM does
        return None

    compile_helpers.__dft_megatron__ = True
    dutils.compile_helpers = compile_helpers
    return "datasets.utils.compile_helpers: skipped where the wheel's helpers_cpp imports"


def install_megatron_training_fixes() -> bool:
    """Fixes megatron.training needs on every device (idempotent). Returns True."""
    global _fixes_applied
    with _lock:
        if _fixes_applied:
            return True
        # The local spec's torch norm under --sequence-parallel: a GPU without TE or apex
        # builds it too (compat/cpu.py says why and how).
        done = [_fix_compile_helpers(), cpu._bridge_torch_norm_sequence_parallel()]
        logger.debug("megatron.training fixes: %s", "; ".join(done))
        _fixes_applied = True
    return True


# ------------------------------------------------------------------ CPU only


def _bridge_allow_no_cuda() -> str:
    from megatron.training import initialize, training

    original = initialize.initialize_megatron
    if getattr(original, "__dft_megatron__", False):
        return "initialize_megatron: allow_no_cuda"

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    initialize_megatron.__dft_megatron__ = True
    initialize.initialize_megatron = initialize_megatron
    training.initialize_megatron = initialize_megatron  # `from ... import` in training.py
    return "initialize_megatron: allow_no_cuda=True"


class _OneDeviceCuda(cpu._CudaOnCpu):
    """torch.cuda for initialize.py: one (CPU) device, set_device a no-op."""

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        return None


class _InitializeTorch(cpu._TorchOnCpu):
    def __init__(self) -> None:
        super().__init__()
        self.cuda = _OneDeviceCuda()


def _bridge_device_count() -> str:
    from megatron.training import initialize

    initialize.torch = _InitializeTorch()
    return "initialize.py: one device (model-parallel init and seeding run), set_device no-op"


def _bridge_jit_warmup() -> str:
    from megatron.training import initialize, training

    def set_jit_fusion_options(tp_size=None):
        return None

    initialize.set_jit_fusion_options = set_jit_fusion_options
    training.set_jit_fusion_options = set_jit_fusion_options
    return "set_jit_fusion_options: no warm-up of GPU fusions"


# Modules whose global `torch` becomes the CPU view (cpu._TorchOnCpu).
_VIEW_MODULES = {
    "megatron.training.training": "device='cuda', torch.cuda.* (pretrain, train, evaluate)",
    "megatron.training.utils.common_utils": "device='cuda' / current_device (reductions)",
    "megatron.training.checkpointing": "CUDA RNG state, device='cuda' in read_metadata",
    "megatron.training.dist_signal_handler": "all_gather of the signal flag",
    "megatron.training.datasets.data_samplers": "torch.cuda in the samplers",
}


def _bridge_view_modules() -> str:
    view = cpu._TorchOnCpu()
    done = []
    for name in _VIEW_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = view
            done.append(name.removeprefix("megatron.training."))
    return f"torch.cuda/device='cuda' on CPU in {', '.join(done)}"


def _bridge_get_model() -> str:
    from megatron.training import training

    if not getattr(training.get_model, "__dft_megatron_cpu_bridge__", False):
        training.get_model = cpu._wrap_tensor_methods(training.get_model)
    return "get_model: module.cuda() leaves CPU tensors in place"


def _bridge_device_arch() -> str:
    from megatron.training import arguments
    from megatron.training.utils import common_utils

    def get_device_arch_version() -> int:
        return 0  # no GPU

    arguments.get_device_arch_version = get_device_arch_version
    common_utils.get_device_arch_version = get_device_arch_version
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return "validate_args: device arch 0 (CPU); CUDA_DEVICE_MAX_CONNECTIONS=1"


def _bridge_data_loader() -> str:
    from megatron.training import training
    from megatron.training.datasets import data_samplers

    original = data_samplers.build_pretraining_data_loader
    if getattr(original, "__dft_megatron__", False):
        return "build_pretraining_data_loader: own generator"

    @functools.wraps(original)
    def build_pretraining_data_loader(dataset, consumed_samples):
        loader = original(dataset, consumed_samples)
        if isinstance(loader, torch.utils.data.DataLoader):
            from megatron.training import get_args

            loader.generator = torch.Generator().manual_seed(get_args().seed)
            loader.pin_memory = False  # needs CUDA; torch warns once per loader
        return loader

    build_pretraining_data_loader.__dft_megatron__ = True
    data_samplers.build_pretraining_data_loader = build_pretraining_data_loader
    training.build_pretraining_data_loader = build_pretraining_data_loader
    return "build_pretraining_data_loader: a generator of its own, no pinned memory"


def install_megatron_training_cpu_bridge(force: bool = False) -> bool:
    """Let megatron.training.pretrain run on CPU; a no-op on GPU. Returns whether it is active.

    Installs `compat.cpu.install_cpu_bridge` (Megatron-Core) first, with the same switch
    (no CUDA device, `force`, or DFT_MEGATRON_CPU=1). Idempotent.
    """
    global _cpu_applied
    install_megatron_training_fixes()
    if not cpu.install_cpu_bridge(force):
        return False
    with _lock:
        if _cpu_applied:
            return True
        pieces = [
            _bridge_allow_no_cuda(),
            _bridge_device_count(),
            _bridge_jit_warmup(),
            _bridge_view_modules(),
            _bridge_get_model(),
            _bridge_device_arch(),
            _bridge_data_loader(),
        ]
        _cpu_applied = True
    logger.info("megatron.training CPU bridge installed: %d patches (DEBUG: details)", len(pieces))
    logger.debug("megatron.training CPU bridge:\n  %s", "\n  ".join(pieces))
    return True
