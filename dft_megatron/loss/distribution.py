"""Statistics of the full-vocabulary distribution from vocabulary shards, for the variants.

- `topk_entropy` (EAFT): the entropy of the softmax over each row's k largest logits. Each rank
  takes its shard's top k, one all-gather over TP brings the tp x k candidates to every rank,
  and the global top k are among them: [tokens, k]-sized traffic, no logits gathered.
- `reference_partials` / `kl_from_partials` (ASFT): KL(pi_ref || pi_theta) per token,

      KL_t = sum_j q_j (log q_j - log p_j) = (sum_j e^{r_j - M_r} (r_j - z_j)) / S_r - lse_r + lse_z

  with r the reference's logits, z the policy's, M_r the reference's row max, S_r =
  sum_j e^{r_j - M_r} and lse = M + log S. The sums over j split over vocabulary shards, so
  the reference's max rides in the policy's MAX all-reduce and its two sums in the policy's
  SUM all-reduce: no collective of its own. The gradient with respect to z is p - q.

Both read shards in fp32 (fp64 stays fp64) and allocate at most a chunk of
`_CHUNK_ELEMENTS` values beyond what they are given.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per transient chunk


def topk_entropy(
    logits_2d: torch.Tensor, k: int, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """[n, v/tp] logits of this rank's shard -> [n] entropy (nats) of the softmax over each
    row's k largest logits across every shard (all of them when the vocabulary is smaller).

    Padded vocabulary columns hold the dtype's finite minimum: they enter only when fewer
    than k real columns exist, with probability 0 and no effect on the entropy.
    """
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    local_k = min(k, logits_2d.size(-1))
    acc = torch.float64 if logits_2d.dtype == torch.float64 else torch.float32
    top = logits_2d.topk(local_k, dim=-1, sorted=False).values.to(acc)  # [n, k']
    if tp > 1:
        gathered = top.new_empty(tp * top.size(0), top.size(1))  # the ranks' blocks, stacked
        dist.all_gather_into_tensor(gathered, top.contiguous(), group=tp_group)
        top = gathered.view(tp, *top.shape).permute(1, 0, 2).reshape(top.size(0), -1)
        top = top.topk(min(k, top.size(-1)), dim=-1, sorted=False).values
    log_q = torch.log_softmax(top, dim=-1)
    return -(log_q.exp() * log_q).sum(dim=-1)


def reference_partials(
    ref_exp: torch.Tensor, ref_max: torch.Tensor, policy_logits: torch.Tensor
) -> torch.Tensor:
    """[n, v/tp] e^{r - M_r} (already exponentiated, M_r the global row max), [n] M_r and the
    policy's raw [n, v/tp] logits -> [n] this shard's sum_j e^{r_j - M_r} (r_j - z_j).

    r_j - M_r is recovered as log e^{r_j - M_r} (xlogy: 0 where the exponential underflowed),
    so the reference's logits need not be kept beside their exponentials.
    """
    n, width = ref_exp.shape
    out = torch.empty(n, dtype=ref_exp.dtype, device=ref_exp.device)
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        e = ref_exp[rows]
        z = policy_logits[rows].to(e.dtype)
        shift = (ref_max[rows].unsqueeze(-1) - z) * e  # e (M_r - z_j)
        out[rows] = (torch.special.xlogy(e, e) + shift).sum(dim=-1)
    return out


def kl_from_partials(
    cross: torch.Tensor,
    ref_sum_exp: torch.Tensor,
    ref_max: torch.Tensor,
    policy_sum_exp: torch.Tensor,
    policy_max: torch.Tensor,
) -> torch.Tensor:
    """[n] all-reduced sums -> [n] KL(pi_ref || pi_theta) (see the module docstring)."""
    ref_lse = ref_max + torch.log(ref_sum_exp)
    policy_lse = policy_max + torch.log(policy_sum_exp)
    return cross / ref_sum_exp - ref_lse + policy_lse
