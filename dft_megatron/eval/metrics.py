"""Sampling metrics over k samples per problem.

- avg@k (the DFT paper's metric): the mean accuracy over the k samples of each problem,
  averaged over problems. With n samples and c correct for a problem, its share is c / n.
- pass@k: the probability that at least one of k samples drawn without replacement from the
  n generated ones is correct, estimated without bias as 1 - C(n-c, k) / C(n, k)
  (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), averaged over
  problems. pass@1 equals avg@n: both are the mean of c / n.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (each problem's list is its k)."""
    if not correct:
        raise ValueError("avg_at_k: no problems")
    return sum(sum(map(bool, s)) / len(s) for s in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems."""
    if not correct:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(pass_at_k(len(s), sum(map(bool, s)), k) for s in correct) / len(correct)


def default_ks(n: int) -> list[int]:
    """The k reported for pass@k with n samples: powers of two below n, and n itself."""
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n:
        ks.append(n)
    return ks
