"""Check a conversion: transformers' model and the Megatron-Core model on the same tokens.

Both run in fp32 on CPU (the weights upcast from whatever dtype they were stored in), on
`batch_size` x `seq_length` random token ids (seeded) below the vocabulary size. Compared:
the logits over the real vocabulary (max absolute difference, argmax agreement) and the
token-mean next-token cross-entropy, transformers' from its logits with torch's
`F.cross_entropy`, Megatron-Core's from the model's own loss path (the vocab-parallel CE
with padded vocabulary columns masked, see DFTGPTModel).

Tolerance (fp32, the two implementations order their sums differently): the max absolute
logits difference within LOGITS_RTOL of the largest |logit|, and the CEs within CE_RTOL of
each other. Argmax agreement is reported, not required (near-ties may flip).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dft_megatron.checkpoint import load_weights, model_config_from_args
from dft_megatron.convert.common import megatron_model
from dft_megatron.convert.megatron_to_hf import load_flags, resolve_checkpoint, session_vocab_size

logger = logging.getLogger(__name__)

LOGITS_RTOL = 1e-4
CE_RTOL = 1e-4


@dataclass
class LogitsComparison:
    """transformers vs Megatron-Core on the same tokens."""

    max_abs_diff: float
    """max |logits_hf - logits_megatron| over the real vocabulary."""
    max_abs_logit: float
    """max |logits_hf| (the scale of the tolerance)."""
    argmax_agreement: float
    """Fraction of positions where both pick the same next token."""
    ce_hf: float
    """Token-mean next-token CE of transformers' logits."""
    ce_megatron: float
    """Token-mean next-token CE of the Megatron-Core model's loss."""
    tokens: int
    """Positions compared."""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= LOGITS_RTOL * self.max_abs_logit and abs(
            self.ce_hf - self.ce_megatron
        ) <= CE_RTOL * abs(self.ce_hf)

    def report(self) -> str:
        return (
            f"{self.tokens} positions: max |logits diff| {self.max_abs_diff:.3e} (largest "
            f"|logit| {self.max_abs_logit:.3f}, tolerance {LOGITS_RTOL * self.max_abs_logit:.3e}"
            f"), argmax agreement {self.argmax_agreement:.2%}, CE transformers "
            f"{self.ce_hf:.6f} vs Megatron-Core {self.ce_megatron:.6f} (tolerance "
            f"{CE_RTOL:.0e} relative): {'PASS' if self.passed else 'FAIL'}"
        )


def random_tokens(vocab_size: int, batch_size: int, seq_length: int, seed: int) -> torch.Tensor:
    """[b, s + 1] token ids: inputs are [:, :-1], next-token targets [:, 1:]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_length + 1), generator=g)


def megatron_logits(
    checkpoint: str | Path, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [b, s, V] fp32 over the real vocabulary, per-token CE [b, s]) of a checkpoint's
    model at TP1 x PP1 in fp32, loaded as training loads it."""
    root, path = resolve_checkpoint(checkpoint, None)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    with megatron_model(load_flags(root, path), torch.float32) as (args, chunks, net):
        load_weights(chunks)
        vocab = session_vocab_size(args)
        with torch.no_grad():
            logits = net(inputs, positions, None)[..., :vocab].clone()
            ce = net(inputs, positions, None, labels=labels)
        del net, chunks
    return logits, ce


def checkpoint_vocab_size(checkpoint: str | Path) -> int:
    """The vocabulary of a checkpoint's model, from its stored args."""
    from megatron.core import dist_checkpointing

    _, path = resolve_checkpoint(checkpoint, None)
    args = dist_checkpointing.load_common_state_dict(str(path))["args"]
    return model_config_from_args(args).vocab_size


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits [b, s, V] in fp32 for the inputs tokens[:, :-1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits.float()
    del model
    return logits


def compare(
    hf: torch.Tensor, megatron: torch.Tensor, ce_megatron: torch.Tensor, tokens
) -> LogitsComparison:
    """LogitsComparison of [b, s, V] logits and Megatron-Core's per-token CE [b, s]."""
    labels = tokens[:, 1:]
    ce_hf = F.cross_entropy(hf.reshape(-1, hf.shape[-1]), labels.reshape(-1))
    return LogitsComparison(
        max_abs_diff=float((hf - megatron).abs().max()),
        max_abs_logit=float(hf.abs().max()),
        argmax_agreement=float((hf.argmax(-1) == megatron.argmax(-1)).float().mean()),
        ce_hf=float(ce_hf),
        ce_megatron=float(ce_megatron.double().mean()),
        tokens=labels.numel(),
    )


def verify_conversion(
    hf_dir: str | Path,
    checkpoint: str | Path,
    *,
    batch_size: int = 2,
    seq_length: int = 64,
    seed: int = 1234,
) -> LogitsComparison:
    """Run both models (one after the other, so at most one fp32 copy is held) and compare."""
    tokens = random_tokens(checkpoint_vocab_size(checkpoint), batch_size, seq_length, seed)
    logits_m, ce_m = megatron_logits(checkpoint, tokens)
    gc.collect()
    logits_h = hf_logits(hf_dir, tokens)
    result = compare(logits_h, logits_m, ce_m, tokens)
    logger.info("verify %s vs %s: %s", hf_dir, checkpoint, result.report())
    return result
