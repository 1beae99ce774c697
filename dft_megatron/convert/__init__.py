"""Hugging Face <-> Megatron-Core checkpoint conversion (llama, mistral, qwen2 families).

- `convert_hf_to_megatron(hf_dir, megatron_dir, ...)`: a Hugging Face folder -> a checkpoint
  that `dft_megatron.train --load DIR --finetune` / `--eval-only` load at any TP x PP.
- `convert_megatron_to_hf(megatron_dir, hf_dir, ...)`: any trainer checkpoint -> a folder
  that `transformers.AutoModelForCausalLM.from_pretrained` loads.
- `verify_conversion(hf_dir, checkpoint)`: both models' logits and CE on the same tokens.

The mapping of configs and tensors is in `families`; the CLIs are tools/convert_*.py.
"""

from dft_megatron.convert.families import ConversionError
from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from dft_megatron.convert.verify import LogitsComparison, verify_conversion

__all__ = [
    "ConversionError",
    "LogitsComparison",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "verify_conversion",
]
