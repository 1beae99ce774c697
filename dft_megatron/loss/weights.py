"""Per-token loss weights: the DFT family as one function of the target probability.

Every variant weights token t's cross-entropy by a function of the stop-gradient of
its target probability p_t = softmax(z_t)[y_t]:

    "sft":  w = 1                                     (plain cross-entropy)
    "dft":  w = sft_mix + (1 - sft_mix) * max(p ** dft_alpha, dft_min_prob)

The defaults (dft_alpha=1, dft_min_prob=0, sft_mix=0) give the paper's w = sg(p).
`dft_min_prob` is a floor that keeps rare target tokens learning, `dft_alpha` sharpens
(> 1) or flattens (< 1) the weighting, `sft_mix` blends in plain SFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("sft", "dft")


@dataclass(frozen=True)
class TokenWeighting:
    """The per-token weight of the loss; validated on construction."""

    loss_type: str = "dft"
    """"sft": plain cross-entropy; "dft": cross-entropy weighted by sg(p) (and the variants)."""

    dft_min_prob: float = 0.0
    """Floor c on the DFT weight: w = max(p ** dft_alpha, c). In [0, 1]."""

    dft_alpha: float = 1.0
    """Power on the target probability in the DFT weight. >= 0; 0 gives w = 1 (SFT)."""

    sft_mix: float = 0.0
    """Blend with SFT: w = sft_mix + (1 - sft_mix) * w_dft. In [0, 1]; 1 gives SFT."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.dft_min_prob <= 1.0:
            raise ValueError(f"dft_min_prob must be in [0, 1], got {self.dft_min_prob}")
        if not self.dft_alpha >= 0.0:
            raise ValueError(f"dft_alpha must be >= 0, got {self.dft_alpha}")
        if not 0.0 <= self.sft_mix <= 1.0:
            raise ValueError(f"sft_mix must be in [0, 1], got {self.sft_mix}")
        if self.loss_type == "sft" and (
            self.dft_min_prob != 0.0 or self.dft_alpha != 1.0 or self.sft_mix != 0.0
        ):
            raise ValueError(
                "dft_min_prob, dft_alpha and sft_mix only apply to loss_type='dft'; with "
                f"loss_type='sft' leave them at their defaults (got dft_min_prob="
                f"{self.dft_min_prob}, dft_alpha={self.dft_alpha}, sft_mix={self.sft_mix})"
            )

    @property
    def is_constant(self) -> bool:
        """True when every token gets weight 1 whatever its probability."""
        return self.loss_type == "sft" or self.sft_mix == 1.0 or self.dft_alpha == 0.0

    def __call__(self, target_prob: torch.Tensor) -> torch.Tensor:
        """[*] target probabilities (fp32, no grad) -> [*] weights, same dtype."""
        if self.is_constant:
            return torch.ones_like(target_prob)
        w = target_prob if self.dft_alpha == 1.0 else target_prob.pow(self.dft_alpha)
        if self.dft_min_prob > 0.0:
            w = w.clamp_min(self.dft_min_prob)
        if self.sft_mix > 0.0:
            w = self.sft_mix + (1.0 - self.sft_mix) * w
        return w
