"""avg@k and pass@k against hand-computed values and brute-force combinatorics."""

from __future__ import annotations

import itertools

import pytest

from dft_megatron.eval.metrics import avg_at_k, default_ks, mean_pass_at_k, pass_at_k


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            # Reference: exhaustive enumeration; tolerance 1e-12 (float products of <= 8 terms).
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_hand_computed():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # n=16, c=2, k=16: every sample is drawn.
    assert pass_at_k(16, 2, 16) == 1.0
    assert pass_at_k(16, 0, 16) == 0.0
    # n=16, c=4, k=1: c/n.
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25, abs=1e-15)
    # n=10, c=3, k=4: 1 - C(7,4)/C(10,4) = 1 - 35/210.
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210, abs=1e-15)


def test_avg_at_k_hand_computed_and_pass_at_1():
    correct = [
        [True, False, False, False],  # 1/4
        [True, True, True, True],  # 1
        [False, False, False, False],  # 0
    ]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1 + 0) / 3, abs=1e-15)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct), abs=1e-15)
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3, abs=1e-15)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])


def test_default_ks():
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(1) == [1]
    assert default_ks(2) == [1, 2]
