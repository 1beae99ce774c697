"""The per-token objective: the DFT family as functions of the target probability.

Every objective here is a function of token t's cross-entropy CE_t = -log p_t (and, for EAFT,
of the predictive distribution's top-k entropy), computed with its derivative with respect to
CE_t. That derivative `scale_t` is all backward needs: the gradient with respect to the logits
is scale_t * (softmax(z_t) - onehot(y_t)), whatever the objective.

    loss type    per-token loss L_t                       scale dL_t/dCE_t        source
    "sft"        CE                                       1                       -
    "dft"        sg(w) CE,  w = max(p^alpha, c)           w                       DFT (2508.05629)
    "asft"       DFT's, plus lambda KL(pi_ref || pi)      w (KL: loss/kl.py)      ASFT (2509.23753)
    "chord"      sg(p (1 - p)) CE                         p (1 - p)               CHORD (2508.11408)
    "eaft"       sg((H_k / ln k)^alpha_e) CE              (H_k / ln k)^alpha_e    EAFT (2601.02151)
    "prob-power" 1 - p^k  (the paper's -p^k, plus 1)      k p^k                   2510.00526

p is the target probability, H_k the entropy of the softmax over the k largest logits of the
full vocabulary. Two modifiers apply to every loss type but "sft":

- `prob_threshold` tau (2510.00526's thresholded variants): tokens with sg(p) < tau get
  loss and scale 0 (the model's prior decides which targets are learned);
- `sft_mix` m (the SFT -> DFT schedule anneals it): L = m CE + (1 - m) L_obj, scale
  m + (1 - m) scale_obj.

`prob-power` is not a weighted cross-entropy: its value is 1 - p^k, its gradient k p^k times
CE's (k = 1 gives -p, whose gradient equals DFT's; k = 10 the paper's -p^10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

LOSS_TYPES = ("sft", "dft", "asft", "chord", "eaft", "prob-power")
_DFT_LIKE = ("dft", "asft")


@dataclass(frozen=True)
class TokenWeighting:
    """The per-token objective and its settings; validated on construction."""

    loss_type: str = "dft"
    """One of LOSS_TYPES (see the module docstring)."""

    dft_min_prob: float = 0.0
    """dft/asft: floor c on the weight, w = max(p ** dft_alpha, c). In [0, 1]."""

    dft_alpha: float = 1.0
    """dft/asft: power on the target probability in the weight. >= 0; 0 gives SFT."""

    sft_mix: float = 0.0
    """Blend with SFT: L = sft_mix CE + (1 - sft_mix) L_obj. In [0, 1]; 1 gives SFT."""

    prob_threshold: float = 0.0
    """Tokens whose target probability is below it get no loss (in [0, 1); 0: none)."""

    prob_power_k: float = 1.0
    """prob-power: the k of 1 - p^k. > 0."""

    eaft_topk: int = 20
    """eaft: the number of largest logits whose renormalized softmax gives the entropy."""

    eaft_alpha: float = 1.0
    """eaft: power on the normalized top-k entropy H_k / ln k. >= 0."""

    kl_coeff: float = 0.0
    """asft: lambda, the weight of KL(pi_ref || pi_theta) per target token. > 0 for asft."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        checks = (
            ("dft_min_prob", 0.0 <= self.dft_min_prob <= 1.0, "in [0, 1]"),
            ("dft_alpha", self.dft_alpha >= 0.0, ">= 0"),
            ("sft_mix", 0.0 <= self.sft_mix <= 1.0, "in [0, 1]"),
            ("prob_threshold", 0.0 <= self.prob_threshold < 1.0, "in [0, 1)"),
            ("prob_power_k", self.prob_power_k > 0.0, "> 0"),
            ("eaft_topk", self.eaft_topk >= 2, ">= 2 (the entropy of one logit is 0)"),
            ("eaft_alpha", self.eaft_alpha >= 0.0, ">= 0"),
            ("kl_coeff", self.kl_coeff >= 0.0, ">= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        defaults = TokenWeighting.__dataclass_fields__
        owners = {
            "dft_min_prob": _DFT_LIKE,
            "dft_alpha": _DFT_LIKE,
            "sft_mix": LOSS_TYPES[1:],
            "prob_threshold": LOSS_TYPES[1:],
            "prob_power_k": ("prob-power",),
            "eaft_topk": ("eaft",),
            "eaft_alpha": ("eaft",),
            "kl_coeff": ("asft",),
        }
        for name, types in owners.items():
            if self.loss_type not in types and getattr(self, name) != defaults[name].default:
                raise ValueError(
                    f"{name} only applies to loss_type {' / '.join(types)}; with loss_type="
                    f"{self.loss_type!r} leave it at its default "
                    f"({defaults[name].default}, got {getattr(self, name)})"
                )
        if self.loss_type == "asft" and self.kl_coeff <= 0.0:
            raise ValueError("loss_type 'asft' needs kl_coeff > 0 (the lambda of its KL term)")

    @property
    def needs_topk_entropy(self) -> bool:
        """EAFT's weight needs the top-k entropy of every target row."""
        return self.loss_type == "eaft" and self.sft_mix < 1.0

    @property
    def needs_reference(self) -> bool:
        """The objective has a KL term to a reference model's distribution."""
        return self.loss_type == "asft"

    @property
    def is_constant(self) -> bool:
        """True when the loss is plain CE, scale 1 for every token whatever its probability."""
        if self.loss_type == "sft" or self.sft_mix == 1.0:
            return True
        no_weight = self.loss_type in _DFT_LIKE and self.dft_alpha == 0.0
        no_weight |= self.loss_type == "eaft" and self.eaft_alpha == 0.0
        return no_weight and self.prob_threshold == 0.0

    def with_sft_mix(self, sft_mix: float) -> TokenWeighting:
        """The same objective with another SFT mix (the schedule's value at an iteration)."""
        return self if sft_mix == self.sft_mix else replace(self, sft_mix=sft_mix)

    def objective_weight(
        self, target_prob: torch.Tensor, topk_entropy: torch.Tensor | None
    ) -> torch.Tensor:
        """[*] sg(p) -> [*] the weight w of the weighted-CE objectives (before the threshold
        and the SFT mix)."""
        p = target_prob
        if self.loss_type in _DFT_LIKE:
            w = p if self.dft_alpha == 1.0 else p.pow(self.dft_alpha)
            return w.clamp_min(self.dft_min_prob) if self.dft_min_prob > 0.0 else w
        if self.loss_type == "chord":
            return p * (1.0 - p)
        if self.loss_type == "eaft":
            if topk_entropy is None:
                raise ValueError("loss_type 'eaft' needs the top-k entropy (topk_entropy)")
            normalized = topk_entropy / math.log(self.eaft_topk)
            return normalized if self.eaft_alpha == 1.0 else normalized.pow(self.eaft_alpha)
        return torch.ones_like(p)

    def terms(
        self,
        target_prob: torch.Tensor,
        cross_entropy: torch.Tensor,
        topk_entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (loss, scale) from sg(p) and CE ([*] fp32 each, the same shape).

        `topk_entropy` (eaft only) is H_k of each row in nats, with k = `eaft_topk` or the
        vocabulary when smaller (normalized by ln eaft_topk either way)."""
        if self.is_constant:
            return cross_entropy.clone(), torch.ones_like(cross_entropy)
        p = target_prob
        if self.loss_type == "prob-power":
            # 1 - p^k = -expm1(-k CE): no cancellation near p = 1, where 1 - p^k is tiny.
            k_ce = self.prob_power_k * cross_entropy
            loss, scale = -torch.expm1(-k_ce), self.prob_power_k * torch.exp(-k_ce)
        else:
            scale = self.objective_weight(p, topk_entropy)
            loss = scale * cross_entropy
        if self.prob_threshold > 0.0:
            keep = (p >= self.prob_threshold).to(scale.dtype)
            loss, scale = loss * keep, scale * keep
        if self.sft_mix > 0.0:
            m = self.sft_mix
            loss = m * cross_entropy + (1.0 - m) * loss
            scale = m + (1.0 - m) * scale
        return loss, scale

    def __call__(self, target_prob: torch.Tensor) -> torch.Tensor:
        """[*] sg(p) -> [*] the scale of a weighted-CE objective that needs nothing but p
        (the per-token weight; for prob-power its derivative)."""
        return self.terms(target_prob, torch.zeros_like(target_prob))[1]


@dataclass(frozen=True)
class SftMixSchedule:
    """The SFT -> DFT schedule: sft_mix from `start` at iteration 0 down to 0 at `iters`.

    A model trained from scratch or a weak base learns first from plain SFT (every target
    token at full weight), then the objective takes over. Linear or cosine in the iteration.
    """

    start: float
    iters: int
    style: str = "linear"

    def __post_init__(self):
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"the schedule's start mix must be in [0, 1], got {self.start}")
        if self.iters < 1:
            raise ValueError(f"the schedule needs >= 1 iteration, got {self.iters}")
        if self.style not in ("linear", "cosine"):
            raise ValueError(f"schedule style must be linear or cosine, got {self.style!r}")

    def __call__(self, iteration: int) -> float:
        """sft_mix at `iteration` (0-based: the iteration being computed)."""
        done = min(max(iteration, 0) / self.iters, 1.0)
        if self.style == "cosine":
            return self.start * 0.5 * (1.0 + math.cos(math.pi * done))
        return self.start * (1.0 - done)
