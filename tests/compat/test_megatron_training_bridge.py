"""The megatron.training bridge (dft_megatron/compat/megatron_training.py), one assumption each.

Each case runs in a fresh interpreter (the bridge patches megatron.training for the whole
process) and prints JSON findings. On CPU every piece is checked for its effect on the very
call that failed without it; with a GPU reported (torch.cuda.is_available patched to True
before any import) the CPU part must change nothing, while the every-device fix
(compile_helpers) still applies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CPU_CHILD = r"""
import json, os, subprocess
import torch

out = {}
from dft_megatron.compat.megatron_training import install_megatron_training_cpu_bridge
out["active"] = install_megatron_training_cpu_bridge()

from megatron.core.datasets import utils as dutils
from megatron.training import arguments, initialize, training
from megatron.training.utils import common_utils
from megatron.training.datasets import data_samplers

# compile_helpers: no `make` in site-packages where the wheel's helpers_cpp imports.
calls = []
real_run = subprocess.run
subprocess.run = lambda *a, **k: calls.append(a) or real_run(["false"])
dutils.compile_helpers()
subprocess.run = real_run
out["make_calls"] = len(calls)

# initialize.py sees one device (model parallel init and seeding run); set_device is a no-op.
out["device_count"] = initialize.torch.cuda.device_count()
initialize.torch.cuda.set_device(3)

# The jit warm-up allocates nothing.
real_rand = torch.rand
torch.rand = lambda *a, **k: (_ for _ in ()).throw(AssertionError("warm-up ran"))
initialize.set_jit_fusion_options(tp_size=2)
torch.rand = real_rand
out["warmup_skipped"] = True

# device='cuda' and torch.cuda.* in megatron.training's modules land on the CPU.
out["cuda_tensors"] = {
    m.__name__: m.torch.zeros(2, device="cuda").device.type
    for m in (training, common_utils, data_samplers)
}
out["synchronize"] = training.torch.cuda.synchronize() is None

# get_model's module.cuda() leaves CPU parameters in place.
out["get_model_wrapped"] = bool(getattr(training.get_model, "__dft_megatron_cpu_bridge__", False))

# validate_args' GPU arch query.
out["arch"] = arguments.get_device_arch_version()
out["max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")

# The data loader: a generator of its own (exact resume with dropout), no pinned memory.
import sys
from megatron.training import global_vars
from megatron.core import parallel_state
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
sys.argv = ["x", "--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "1",
            "--seq-length", "4", "--max-position-embeddings", "4", "--micro-batch-size", "2",
            "--num-workers", "0", "--seed", "5"]
ns = arguments.parse_args()
arguments.validate_args(ns, {})
global_vars.set_args(ns)
# initialize_megatron asserts CUDA unless allow_no_cuda, which pretrain never passes.
initialize.initialize_megatron(skip_mpu_initialization=True)
out["initialize_without_cuda"] = True
dist.init_process_group("gloo", rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
loader = training.build_pretraining_data_loader(list(range(8)), 0)
before = torch.get_rng_state()
batches = [b.tolist() for b in loader]
untouched = torch.equal(before, torch.get_rng_state())  # the dropout stream on CPU
out["loader_generator_own"] = loader.generator is not None and untouched
out["pin_memory"] = loader.pin_memory
out["batches"] = batches
print("JSON" + json.dumps(out))
"""

_GPU_CHILD = r"""
import json
import torch
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
from megatron.training import initialize, training
from megatron.training.utils import common_utils
before = {
    "initialize": id(initialize.initialize_megatron), "get_model": id(training.get_model),
    "torch": id(training.torch), "init_torch": id(initialize.torch),
    "arch": id(common_utils.get_device_arch_version), "jit": id(initialize.set_jit_fusion_options),
}
from dft_megatron.compat.megatron_training import install_megatron_training_cpu_bridge
from megatron.core.datasets import utils as dutils
out = {"active": install_megatron_training_cpu_bridge()}
after = {
    "initialize": id(initialize.initialize_megatron), "get_model": id(training.get_model),
    "torch": id(training.torch), "init_torch": id(initialize.torch),
    "arch": id(common_utils.get_device_arch_version), "jit": id(initialize.set_jit_fusion_options),
}
out["changed"] = sorted(k for k in before if before[k] != after[k])
out["compile_helpers_fixed"] = bool(getattr(dutils.compile_helpers, "__dft_megatron__", False))
print("JSON" + json.dumps(out))
"""


def _child(code: str) -> dict:
    from tests.dist import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PORT": str(free_port())}
    env.pop("DFT_MEGATRON_CPU", None)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


@pytest.fixture(scope="module")
def on_cpu():
    return _child(_CPU_CHILD)


def test_bridge_is_active_on_cpu(on_cpu):
    assert on_cpu["active"] is True


def test_compile_helpers_does_not_run_make(on_cpu):
    assert on_cpu["make_calls"] == 0


def test_initialize_megatron_allows_no_cuda(on_cpu):
    assert on_cpu["initialize_without_cuda"]


def test_initialize_sees_one_device(on_cpu):
    assert on_cpu["device_count"] == 1


def test_jit_warmup_is_skipped(on_cpu):
    assert on_cpu["warmup_skipped"]


def test_cuda_tensors_land_on_cpu_in_megatron_training(on_cpu):
    assert set(on_cpu["cuda_tensors"].values()) == {"cpu"}
    assert on_cpu["synchronize"]


def test_get_model_is_wrapped(on_cpu):
    assert on_cpu["get_model_wrapped"]


def test_device_arch_and_max_connections(on_cpu):
    assert on_cpu["arch"] == 0 and on_cpu["max_connections"] == "1"


def test_data_loader_has_its_own_generator_and_no_pinned_memory(on_cpu):
    assert on_cpu["loader_generator_own"] and on_cpu["pin_memory"] is False
    assert on_cpu["batches"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_cpu_part_is_a_noop_with_a_gpu():
    out = _child(_GPU_CHILD)
    assert out["active"] is False
    assert out["changed"] == []
    assert out["compile_helpers_fixed"]  # the every-device fix applies on GPUs too


_TE_CHILD = r"""
import json
from megatron.core.optimizer import distrib_optimizer
distrib_optimizer.HAVE_APEX_OR_TE = True  # as in the NGC container
cls = distrib_optimizer.DistributedOptimizer
names = ("_set_main_param_and_optimizer_states", "state_dict", "load_state_dict")
before = {n: id(vars(cls)[n]) for n in names}
from dft_megatron.compat import install_distributed_optimizer_fixes
install_distributed_optimizer_fixes()
print("JSON" + json.dumps(sorted(n for n in names if id(vars(cls)[n]) != before[n])))
"""


def test_distributed_optimizer_no_grad_copy_applies_with_te_or_apex():
    """An fp32 main param is a view of a leaf that requires grad with any optimizer: the
    in-place copy of a resume runs under no_grad also where TE or apex is installed; the
    torch-AdamW fixes do not apply there."""
    assert _child(_TE_CHILD) == ["_set_main_param_and_optimizer_states"]
