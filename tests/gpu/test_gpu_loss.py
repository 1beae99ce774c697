"""vocab_parallel_dft_cross_entropy on CUDA (TP 1, in process) against the float64 reference.

The same cases and tolerances as tests/loss/test_cross_entropy.py (which runs them on the CPU):
every loss variant, fp32 / bf16 / fp16 logits, [s, b, v] and [tokens, v] shapes, loss,
gradient and the returned statistics compared with a float64 computation of the formula on
the CPU. Also on CUDA: ignored targets give exact zeros, and out-of-vocabulary targets raise
(the check reads the target tensor back to the host). TP > 1 over NCCL is covered by the
trainer's layout tests in test_gpu_paths.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.loss.test_cross_entropy import (
    all_cases,
    check_all_ignored,
    check_bad_target,
    check_case,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("variant,dtype_name,shape_name", list(all_cases()))
def test_cuda_matches_float64_reference(variant, dtype_name, shape_name):
    check_case(variant, dtype_name, shape_name, seed=11, device="cuda")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_cuda_ignore_index(dtype_name):
    check_case("dft_all", dtype_name, "sbv", seed=12, ignore=True, device="cuda")


def test_cuda_all_ignored_gives_zeros():
    check_all_ignored(device="cuda")


def test_cuda_bad_targets():
    check_bad_target(device="cuda")
