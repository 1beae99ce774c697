"""The DFT loss entries on CUDA (TP 1, in process) against the float64 reference.

`vocab_parallel_dft_cross_entropy` and `fused_vocab_parallel_dft_cross_entropy` (its kernels
compiled by Triton there), and `chunked_output_layer_dft_cross_entropy`.

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
    ENTRIES,
    all_cases,
    check_all_ignored,
    check_bad_target,
    check_case,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant,dtype_name,shape_name", list(all_cases()))
def test_cuda_matches_float64_reference(variant, dtype_name, shape_name, entry):
    check_case(variant, dtype_name, shape_name, seed=11, device="cuda", entry=entry)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_cuda_ignore_index(dtype_name, entry):
    check_case("dft_all", dtype_name, "sbv", seed=12, ignore=True, device="cuda", entry=entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_cuda_all_ignored_gives_zeros(entry):
    check_all_ignored(device="cuda", entry=entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_cuda_bad_targets(entry):
    check_bad_target(device="cuda", entry=entry)


@pytest.mark.parametrize(
    "case", [{}, dict(ignore=True, unpadded=90), dict(main_grad=True, tied=True)], ids=str
)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_cuda_chunked_output_layer(dtype_name, case):
    from tests.loss.test_output_layer import check_chunked

    check_chunked("dft_all", dtype_name, seed=22, device="cuda", **case)
