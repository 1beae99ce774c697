"""When the CPU bridge switches on, and that it changes nothing when it does not.

Each case runs in a fresh interpreter (the bridge patches Megatron-Core for the whole process),
where `torch.cuda.is_available` is made to report a GPU before anything is imported. The child
records the identity of every object the bridge may replace (each bridged module's `torch`, the
RNG functions, the wrapped methods, `Tensor.type` and `Tensor.cuda`) before and after each
call, and prints its findings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import importlib, inspect, json, logging, os, sys
import torch

torch.cuda.is_available = lambda: True  # a GPU, as far as anyone asks
torch.cuda.current_device = lambda: 0

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("dft_megatron").addHandler(handler)
logging.getLogger("dft_megatron").setLevel(logging.INFO)

from dft_megatron import compat
from dft_megatron.compat import cpu

out = {"megatron_imported_by_compat": any(n.startswith("megatron") for n in sys.modules)}


def snapshot():
    ids = {}
    for name in cpu._VIEW_MODULES:
        ids[name] = id(importlib.import_module(name).torch)
    for module_name, class_name, func in cpu._TENSOR_METHOD_FUNCTIONS:
        owner = importlib.import_module(module_name)
        # The raw class attribute: a classmethod's bound method is a new object per lookup.
        attr = vars(getattr(owner, class_name))[func] if class_name else getattr(owner, func)
        ids[f"{module_name}.{class_name}.{func}"] = id(attr)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for obj, attr in [
        (mrandom, "_get_cuda_rng_state"),
        (mrandom, "_set_cuda_rng_state"),
        (mrandom.CudaRNGStatesTracker, "fork"),
        (DistributedOptimizer, "state_dict"),
        (DistributedOptimizer, "load_state_dict"),
        (DistributedOptimizer, "_set_main_param_and_optimizer_states"),
        (WrappedTorchNorm, "__new__"),
        (moptimizer, "clip_grad_by_total_norm_fp32"),
        (torch.Tensor, "type"),
        (torch.Tensor, "cuda"),
    ]:
        ids[f"{obj.__name__}.{attr}"] = id(inspect.getattr_static(obj, attr))
    return ids


before = snapshot()
out["device_before"] = str(compat.device())
mode = sys.argv[1]
if mode == "env":
    os.environ["DFT_MEGATRON_CPU"] = "1"
first = compat.install_cpu_bridge(force=(mode == "force"))
after_first = snapshot()
second = compat.install_cpu_bridge(force=(mode == "force"))
after_second = snapshot()
# What the trainer calls next on every device: the distributed optimizer's fixes for torch
# AdamW (no TE or apex here), applied by the bridge already or now on their own.
fixes = compat.install_distributed_optimizer_fixes()
after_fixes = snapshot()
from megatron.core.optimizer import distrib_optimizer
out.update(
    fixes=fixes,
    have_apex_or_te=distrib_optimizer.HAVE_APEX_OR_TE,
    changed_by_fixes=sorted(k for k in before if after_second[k] != after_fixes[k]),
)
out.update(
    first=first,
    second=second,
    active=compat.cpu_bridge_active(),
    device_after=str(compat.device()),
    changed_by_first=sorted(k for k in before if before[k] != after_first[k]),
    changed_by_second=sorted(k for k in before if after_first[k] != after_second[k]),
    n_keys=len(before),
    install_logs=sum("CPU bridge installed" in r.getMessage() for r in records),
    warnings=[r.getMessage() for r in records if r.levelno >= logging.WARNING],
)
print("RESULT " + json.dumps(out))
"""


def _run_child(mode: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DFT_MEGATRON_CPU"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def children() -> dict[str, dict]:
    # The three interpreters start together: their imports overlap on the two cores.
    procs = {mode: _run_child(mode) for mode in ("gpu", "force", "env")}
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{stderr[-4000:]}"
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
        results[mode] = json.loads(line.removeprefix("RESULT "))
    return results


def test_compat_imports_without_megatron(children):
    """Importing dft_megatron.compat pulls in neither Megatron-Core nor anything CUDA-only."""
    assert not children["gpu"]["megatron_imported_by_compat"]


def test_noop_when_cuda_is_available(children):
    gpu = children["gpu"]
    assert gpu["first"] is False and gpu["second"] is False and gpu["active"] is False
    assert gpu["changed_by_first"] == [] and gpu["changed_by_second"] == []
    assert gpu["device_before"] == gpu["device_after"] == "cuda:0"
    assert gpu["install_logs"] == 0


def test_distributed_optimizer_fixes_apply_on_gpu_without_te(children):
    """On a GPU without TE/apex the distributed optimizer's checkpoint fixes apply on their own
    (the CPU bridge stays off); where the bridge is on it has applied them already."""
    gpu = children["gpu"]
    assert gpu["have_apex_or_te"] is False  # this test's environment: neither is installed
    assert gpu["fixes"] is True and gpu["active"] is False
    assert gpu["changed_by_fixes"] == [
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        "DistributedOptimizer.load_state_dict",
        "DistributedOptimizer.state_dict",
    ]
    for mode in ("force", "env"):
        assert children[mode]["fixes"] is True and children[mode]["changed_by_fixes"] == []


@pytest.mark.parametrize("mode", ["force", "env"])
def test_forced_bridge_is_idempotent(children, mode):
    """`force=True` or DFT_MEGATRON_CPU=1 bridge even with a GPU; a second call changes nothing
    and the installation is logged once."""
    res = children[mode]
    assert res["first"] is True and res["second"] is True and res["active"] is True
    # Everything listed is bridged (Tensor.type/.cuda are only swapped during calls).
    assert len(res["changed_by_first"]) == res["n_keys"] - 2, res["changed_by_first"]
    assert "Tensor.type" not in res["changed_by_first"]
    assert res["changed_by_second"] == []
    assert res["device_after"] == "cpu"
    assert res["install_logs"] == 1
    assert res["warnings"] == []
