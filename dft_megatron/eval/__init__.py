"""Math evaluation with the DFT paper's protocol (Wu et al. 2025, arXiv 2508.05629).

k samples per problem (16) at temperature 1.0, top-p 1.0, up to 4096 new tokens; the final
answer is the last `\\boxed{}`; mathematical equivalence by math_verify; avg@k (the paper's
metric) and pass@k per benchmark and averaged.

- `answers`: extraction and equivalence (`extract_boxed_answer`, `judge_answer`,
  `EquivalenceJudge`)
- `metrics`: `avg_at_k`, `pass_at_k`
- `prompts`: the `qwen-boxed` and `base` prompt templates
- `benchmarks`: JSON Lines benchmarks (the Qwen2.5-Math evaluation data format)
- `backends`: `TransformersBackend`, `VLLMBackend` (torch and vLLM are imported there only)
- `runner`: `run_evaluation`, the cached, resumable loop; `tools/eval_math.py` is its CLI
"""

from dft_megatron.eval.answers import (
    EquivalenceJudge,
    Judgement,
    extract_boxed_answer,
    judge_answer,
    normalized_equal,
)
from dft_megatron.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k
from dft_megatron.eval.prompts import PROMPT_TEMPLATES, get_prompt_template

__all__ = [
    "PROMPT_TEMPLATES",
    "EquivalenceJudge",
    "Judgement",
    "avg_at_k",
    "extract_boxed_answer",
    "get_prompt_template",
    "judge_answer",
    "mean_pass_at_k",
    "normalized_equal",
    "pass_at_k",
]
