"""GPT-family models on Megatron-Core with the DFT loss."""

from dft_megatron.models.config import FAMILIES, ModelConfig
from dft_megatron.models.gpt import (
    DFTGPTModel,
    PrecisionConfig,
    build_gpt_model,
    transformer_config,
)

__all__ = [
    "FAMILIES",
    "DFTGPTModel",
    "ModelConfig",
    "PrecisionConfig",
    "build_gpt_model",
    "transformer_config",
]
