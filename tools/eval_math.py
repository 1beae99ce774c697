"""Evaluate a Hugging Face model on math benchmarks with the DFT paper's protocol.

    python tools/eval_math.py --model HF_DIR \\
        --benchmarks math500=data/math500/test.jsonl,aime24=data/aime24/test.jsonl \\
        --output-dir eval_out [--prompt-template qwen-boxed] [--num-samples 16] \\
        [--answer-fallback]

k samples per problem at temperature 1.0 / top-p 1.0, up to 4096 new tokens; the last
\\boxed{} is the answer, judged by math_verify; avg@k (the paper's metric) and pass@k per
benchmark and averaged go to OUTPUT_DIR/results.json and a table. A completion without a
complete box has no answer, unless --answer-fallback reads it as the Qwen2.5-Math harness
does (unclosed box, "the answer is ...", last number); results.json names the extraction
(`answer_extraction`). Completions are cached in OUTPUT_DIR/<name>.completions.jsonl:
rerunning the same command resumes, and rerunning it with or without --answer-fallback
rescores them without generating.
The logic lives in dft_megatron.eval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dft_megatron.eval.answers import ANSWER_EXTRACTION_BOXED, ANSWER_EXTRACTION_FALLBACK
from dft_megatron.eval.benchmarks import resolve_benchmarks
from dft_megatron.eval.prompts import PROMPT_TEMPLATES
from dft_megatron.eval.runner import (
    RESULTS_FILE,
    CacheMismatchError,
    EvalConfig,
    format_results_table,
    run_evaluation,
)
from dft_megatron.utils.logging import setup_logging


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        description="Evaluate a Hugging Face model on math benchmarks with the DFT paper's "
        "protocol (k samples, last \\boxed{} judged by math_verify, avg@k and pass@k).",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (or hub id)")
    p.add_argument(
        "--benchmarks",
        required=True,
        help="NAME=PATH.jsonl[,NAME=PATH.jsonl...], or a directory of <name>.jsonl or "
        "<name>/test.jsonl (the Qwen2.5-Math evaluation/data layout)",
    )
    p.add_argument("--output-dir", required=True, help="completions cache, samples, results.json")
    p.add_argument(
        "--prompt-template",
        choices=sorted(PROMPT_TEMPLATES),
        default=d.prompt_template,
        help="qwen-boxed: the chat prompt of the paper (tokenizer's chat template); base: plain "
        "'Question: ... Answer:' text for models without one (default: %(default)s)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=d.num_samples,
        help="k per problem (default: %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help="0: greedy (default: %(default)s)"
    )
    p.add_argument("--top-p", type=float, default=d.top_p, help="(default: %(default)s)")
    p.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per generate call and per cache write (default: transformers 8, vLLM 1024)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "vllm", "transformers"],
        default="auto",
        help="auto: vLLM when it imports and a GPU is visible, else transformers "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-problems", type=int, default=None, help="first N problems per benchmark (smoke)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs per model, vLLM only (default: 1)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="model dtype (bfloat16, float32, ...); default bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--problem-key",
        default=None,
        help="JSON key of the problem text (default: problem, then question)",
    )
    p.add_argument(
        "--answer-key",
        default=None,
        help="JSON key of the gold answer (default: answer, then final_answer, gt, then "
        "the last box of solution)",
    )
    p.add_argument(
        "--judge-workers",
        type=int,
        default=d.judge_workers,
        help="processes running math_verify (default: %(default)s)",
    )
    p.add_argument(
        "--answer-fallback",
        action="store_true",
        help="for a completion without a complete \\boxed{}, take the answer as the Qwen2.5-Math "
        "harness does: an unclosed last box, else the text after the last 'the answer is', else "
        "the last number (default: no box, no answer)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    config = EvalConfig(
        prompt_template=args.prompt_template,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        max_problems=args.max_problems,
        problem_key=args.problem_key,
        answer_key=args.answer_key,
        judge_workers=args.judge_workers,
        answer_extraction=(
            ANSWER_EXTRACTION_FALLBACK if args.answer_fallback else ANSWER_EXTRACTION_BOXED
        ),
    )
    if args.model.startswith(("/", "./", "../", "~")) and not Path(args.model).is_dir():
        print(f"error: --model {args.model}: no such folder", file=sys.stderr)
        return 2
    try:
        config.validate()
        benchmarks = resolve_benchmarks(args.benchmarks)
        from dft_megatron.eval.backends import make_backend

        backend = make_backend(
            args.backend,
            args.model,
            seed=args.seed,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
        )
        results = run_evaluation(backend, benchmarks, args.output_dir, config)
    except (ValueError, OSError, ImportError, CacheMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results_table(results))
    print(f"\nresults: {Path(args.output_dir) / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
