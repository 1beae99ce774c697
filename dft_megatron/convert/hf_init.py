"""A randomly initialized Hugging Face model of a supported family, sized by a ModelConfig,
saved with a tokenizer: the starting point of the CPU quickstart (and of experiments that
need a model no hub has), which then goes through the same import as a downloaded one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dft_megatron.convert.common import prepare_output
from dft_megatron.convert.families import model_config_to_hf
from dft_megatron.models import ModelConfig

logger = logging.getLogger(__name__)


def init_hf_model(
    model: ModelConfig,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    seed: int = 1234,
    force: bool = False,
) -> Path:
    """Write `out` (config.json, model.safetensors, generation_config.json, tokenizer files):
    `model`'s architecture with transformers' own initialization (seeded) and the vocabulary
    of the tokenizer in `tokenizer_dir`. Returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model.vocab_size = len(tokenizer)
    model.validate()
    ids = {
        name: getattr(tokenizer, name)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(tokenizer, name) is not None
    }
    config = model_config_to_hf(model, **ids)
    out = prepare_output(out, force, source=tokenizer_dir)
    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    net.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    n = sum(p.numel() for p in net.parameters())
    logger.info("wrote a random-init %s model (%.2fM parameters) to %s", model.family, n / 1e6, out)
    return out
