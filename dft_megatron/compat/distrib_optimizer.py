"""Megatron-Core's distributed optimizer on torch's AdamW (no Transformer Engine, no apex).

Without TE and apex (``megatron.core.optimizer.distrib_optimizer.HAVE_APEX_OR_TE`` false),
Megatron-Core's distributed optimizer wraps torch.optim.AdamW, whose per-param state holds a
``step`` tensor and is empty until the first step; with fp32 params its "main params" are
views of the model's parameters. Its checkpoint code trips on all three: a fresh optimizer
cannot load a checkpoint (``assert len(steps) == 1`` in ``DistributedOptimizer.state_dict``),
a resumed run took Adam steps with a wrong step count, and "dp_reshardable" loads of fp32
params raised. Found first on CPU (tests/compat, tests/training), where this is always the
configuration; then on an H100 without TE (docs/LOG.md, 2026-11-24), where a bf16 run with
``--use-distributed-optimizer`` could not resume from its own checkpoint.

`install_distributed_optimizer_fixes` applies the in-place copy under no_grad on every
device (an fp32 main param is a view of a leaf that requires grad whatever the optimizer:
with TE or apex installed, an fp32 --use-distributed-optimizer resume raised the same
"in-place operation" error), and the torch-AdamW fixes where torch's optimizer is in use (or
when forced: the CPU bridge applies them as part of itself); TE's and apex's fused optimizers
keep ``step`` per param group and create their state at construction, so those fixes are
left out there. It is idempotent and thread-safe, and imports Megatron-Core only when
called.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading

import torch

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_summary: str | None = None


def _apply(force: bool) -> str:
    """Patch `DistributedOptimizer`; returns what was patched (see the module docstring)."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_cls = distrib_optimizer.DistributedOptimizer
    set_states = optimizer_cls._set_main_param_and_optimizer_states

    # optimizer/distrib_optimizer.py `_set_main_param_and_optimizer_states` copies the loaded
    # main param and moments in place. `load_parameter_state_from_dp_reshardable` calls it
    # without torch.no_grad(), and an fp32 main param is a view of a leaf that requires grad:
    # "a view of a leaf Variable ... in-place operation". With torch AdamW it also copies every
    # tensor of the per-param state, `step` included, from `tensors`, though no checkpoint
    # format carries the step there (load_state_dict restores it from the param groups):
    # "fully_reshardable" has no `step` entry (KeyError('step')) and "dp_reshardable" holds a
    # LocalNonpersistentObject, i.e. the load template's own value, which reset the restored
    # step (to 0 for a fresh optimizer). Now: under no_grad, the step is never copied, and
    # other missing keys are skipped like the non-tensor entries it already skips.
    @functools.wraps(set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        loaded = collections.defaultdict(lambda: None, tensors)
        loaded.pop("step", None)
        with torch.no_grad():
            return set_states(self, model_param, loaded)

    optimizer_cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    bridged = ["_set_main_param_and_optimizer_states"]

    if force or not distrib_optimizer.HAVE_APEX_OR_TE:
        state_dict = optimizer_cls.state_dict
        load_state_dict = optimizer_cls.load_state_dict

        # `DistributedOptimizer.state_dict` reads the step from the inner optimizer's per-param
        # state (`assert len(steps) == 1`); before the first step that state is empty and the
        # assert fails, and `sharded_state_dict(is_loading=True)` calls state_dict() first: a
        # fresh optimizer could not load a checkpoint. A never-stepped optimizer is reported
        # at step 0, which is what it is.
        @functools.wraps(state_dict)
        def state_dict_before_first_step(self):
            inner = self.optimizer
            if len(inner.state) > 0:
                return state_dict(self)
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p]["step"] = torch.zeros(())
            try:
                return state_dict(self)
            finally:
                inner.state.clear()

        # `load_state_dict` puts ONE `step` tensor object into every param's state
        # (`s["step"] = step`), and torch's AdamW increments each param's step in place: after
        # the next step every param read step = 1 + number of params, and the bias correction
        # after a resume was wrong. Each param gets its own copy.
        @functools.wraps(load_state_dict)
        def load_state_dict_own_steps(self, state_dict):
            load_state_dict(self, state_dict)
            for param_state in self.optimizer.state.values():
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = param_state["step"].clone()

        optimizer_cls.state_dict = state_dict_before_first_step
        optimizer_cls.load_state_dict = load_state_dict_own_steps
        bridged += ["state_dict", "load_state_dict"]
    return f"DistributedOptimizer checkpoints: {', '.join(bridged)}"


def install_distributed_optimizer_fixes(force: bool = False) -> bool:
    """Fix Megatron-Core's distributed-optimizer checkpoints on torch's AdamW; see the module.

    The no_grad copy applies everywhere; the torch-AdamW fixes where neither TE nor apex is
    importable (Megatron-Core then uses torch's optimizers) or when `force`. Returns True.
    Call before the first checkpoint save or load; a second call is a no-op.
    """
    global _summary
    with _lock:
        if _summary is not None:
            return True
        _summary = _apply(force)
    logger.debug("Megatron-Core distributed optimizer on torch AdamW: fixed %s", _summary)
    return True


def summary() -> str | None:
    """What `install_distributed_optimizer_fixes` patched, or None before it has."""
    return _summary
