"""The evaluation loop: k samples per problem, cached, judged, summarized.

For each benchmark: render every problem's prompt, generate the (problem, sample) pairs that
the cache does not hold yet, appending each finished batch to
`<output-dir>/<name>.completions.jsonl` (so an interrupted run resumes where it stopped),
then extract and judge every sample, write `<name>.samples.jsonl` (answer, verdict, judge per
sample) and summarize (avg@k, pass@k, no-answer, truncated and fallback-judged fractions).
`results.json` holds every benchmark and their unweighted average (the paper averages its
five benchmarks).

A cache only serves the settings that made it: `<output-dir>/generation.json` records the
model, template, temperature, top-p, max new tokens and seed, and every cached completion
the SHA-1 of its prompt; a mismatch stops the run with a message instead of mixing samples.
The number of samples is not part of it: raising `--num-samples` generates only the new
ones, lowering it scores the first k. Nor is the answer extraction (`answer_extraction`:
`boxed`, the strict default, or `boxed+harness-fallback`, the Qwen2.5-Math harness's reading
of completions without a box; see dft_megatron.eval.answers): rerunning with the other one
rescores the cached completions, and `results.json` names the one used.

Reproducibility: a batch's sampling seed derives from `--seed`, the benchmark and its first
(problem, sample) pair, so a rerun of the same pending pairs with the same batch size
reproduces; a resumed run batches differently and draws different (equally valid) samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dft_megatron.eval.answers import (
    ANSWER_EXTRACTION_BOXED,
    ANSWER_EXTRACTION_FALLBACK,
    ANSWER_EXTRACTIONS,
    JUDGE_FALLBACK,
    JUDGE_NO_ANSWER,
    SOURCE_BOXED,
    EquivalenceJudge,
    locate_answer,
)
from dft_megatron.eval.backends import GenerationBackend, SamplingConfig
from dft_megatron.eval.benchmarks import Problem, load_benchmark
from dft_megatron.eval.metrics import avg_at_k, default_ks, mean_pass_at_k
from dft_megatron.eval.prompts import get_prompt_template

logger = logging.getLogger(__name__)

GENERATION_FILE = "generation.json"
RESULTS_FILE = "results.json"


class CacheMismatchError(RuntimeError):
    """The output directory's cached completions were made with other settings."""


@dataclass
class EvalConfig:
    """The evaluation protocol; the defaults are the DFT paper's."""

    prompt_template: str = "qwen-boxed"
    """`qwen-boxed` (chat) or `base` (plain text); see dft_megatron.eval.prompts."""
    num_samples: int = 16
    """k: samples per problem."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    batch_size: int | None = None
    """Prompts per generate call (and per cache write); None: the backend's default."""
    max_problems: int | None = None
    """Evaluate only the first N problems of each benchmark (smoke runs)."""
    problem_key: str | None = None
    """JSON key of the problem text; None: `problem`, then `question`, ..."""
    answer_key: str | None = None
    """JSON key of the gold answer; None: `answer`, then `final_answer`, ..."""
    judge_workers: int = 2
    """Processes that run math_verify."""
    judge_timeout_s: int = 5
    """math_verify's own timeout per parse and comparison (its worker is killed at 4x)."""
    answer_extraction: str = ANSWER_EXTRACTION_BOXED
    """`boxed`: the last complete box, else no answer; `boxed+harness-fallback`: without a
    box, the Qwen2.5-Math harness's fallbacks (unclosed box, "the answer is", last number)."""

    def validate(self) -> None:
        get_prompt_template(self.prompt_template)
        if self.answer_extraction not in ANSWER_EXTRACTIONS:
            raise ValueError(
                f"answer_extraction must be one of {', '.join(ANSWER_EXTRACTIONS)}, "
                f"got {self.answer_extraction!r}"
            )
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"--max-problems must be >= 1, got {self.max_problems}")
        if self.temperature == 0 and self.num_samples > 1:
            logger.warning(
                "--temperature 0 (greedy) with --num-samples %d: the samples are identical",
                self.num_samples,
            )


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _check_generation_settings(output_dir: Path, settings: dict) -> None:
    path = output_dir / GENERATION_FILE
    if path.exists():
        cached = json.loads(path.read_text())
        diff = {k: (cached.get(k), v) for k, v in settings.items() if cached.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: cached {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CacheMismatchError(
                f"{path}: the completions in {output_dir} were generated with other settings "
                f"({changes}); use another --output-dir, or delete {output_dir} to start over"
            )
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


class CompletionCache:
    """The JSON Lines file of a benchmark's generated completions, one (problem, sample) each."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, prompt_sha1: list[str], num_samples: int) -> dict[tuple[int, int], dict]:
        """The cached records of this run's pairs; checks their prompts; repairs a torn tail."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            # The last line lacks its newline: the writer was killed mid-line. Cut it off so
            # that appends start on a fresh line.
            logger.warning("%s: dropping an incomplete last line (interrupted write)", self.path)
            keep = raw.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(keep)
            lines.pop()
        done: dict[tuple[int, int], dict] = {}
        outside = 0
        for lineno, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{lineno}: not valid JSON ({e})") from e
            key = (rec["problem_index"], rec["sample_index"])
            if key[0] >= len(prompt_sha1) or key[1] >= num_samples:
                outside += 1
                continue
            if rec["prompt_sha1"] != prompt_sha1[key[0]]:
                raise CacheMismatchError(
                    f"{self.path}:{lineno}: problem {key[0]} was generated from another prompt "
                    "(the benchmark file, --prompt-template or the tokenizer's chat template "
                    "changed); use another --output-dir or delete this file"
                )
            done.setdefault(key, rec)
        if outside:
            logger.info(
                "%s: %d cached samples lie beyond this run's problems or samples; kept, not scored",
                self.path,
                outside,
            )
        return done

    def append(self, records: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _batch_seed(seed: int, name: str, first: tuple[int, int]) -> int:
    return zlib.crc32(f"{seed}:{name}:{first[0]}:{first[1]}".encode()) & 0x7FFFFFFF


def generate_benchmark(
    backend: GenerationBackend,
    name: str,
    problems: list[Problem],
    cache: CompletionCache,
    config: EvalConfig,
) -> dict[tuple[int, int], dict]:
    """Every (problem, sample) completion of one benchmark, generating what is not cached."""
    template = get_prompt_template(config.prompt_template)
    prompts = [template.render(p.problem, backend.tokenizer) for p in problems]
    shas = [_sha1(p) for p in prompts]
    done = cache.load(shas, config.num_samples)
    pending = [
        (pi, si)
        for pi in range(len(problems))
        for si in range(config.num_samples)
        if (pi, si) not in done
    ]
    logger.info(
        "%s: %d problems x %d samples; %d cached, %d to generate",
        name,
        len(problems),
        config.num_samples,
        len(done),
        len(pending),
    )
    sampling = SamplingConfig(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        stop=template.stop,
    )
    batch_size = config.batch_size or backend.default_batch_size
    with tqdm(total=len(pending), desc=f"generate {name}", unit="sample") as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            completions = backend.generate(
                [prompts[pi] for pi, _ in batch],
                sampling,
                seed=_batch_seed(config.seed, name, batch[0]),
                add_special_tokens=not template.uses_chat_template,
            )
            if len(completions) != len(batch):
                raise RuntimeError(
                    f"{type(backend).__name__}.generate returned {len(completions)} "
                    f"completions for {len(batch)} prompts"
                )
            records = [
                {
                    "problem_index": pi,
                    "sample_index": si,
                    "prompt_sha1": shas[pi],
                    "completion": c.text,
                    "finish_reason": c.finish_reason,
                    "num_tokens": c.num_tokens,
                }
                for (pi, si), c in zip(batch, completions, strict=True)
            ]
            cache.append(records)
            done.update({(r["problem_index"], r["sample_index"]): r for r in records})
            bar.update(len(batch))
    return done


def score_benchmark(
    problems: list[Problem],
    completions: dict[tuple[int, int], dict],
    num_samples: int,
    judge: EquivalenceJudge,
    samples_path: Path,
    answer_extraction: str = ANSWER_EXTRACTION_BOXED,
) -> dict:
    """Judge every sample, write them to `samples_path`, and return the benchmark's metrics.

    Each sample row says where its answer came from (`answer_source`: `boxed`, a harness
    fallback's source, or null when none was found).
    """
    keys = [(pi, si) for pi in range(len(problems)) for si in range(num_samples)]
    fallback = answer_extraction == ANSWER_EXTRACTION_FALLBACK
    found = [locate_answer(completions[key]["completion"], fallback) for key in keys]
    predictions = [x.answer if x else None for x in found]
    verdicts = judge.judge_many(
        [(problems[pi].answer, pred) for (pi, _), pred in zip(keys, predictions, strict=True)]
    )
    correct = [[False] * num_samples for _ in problems]
    with samples_path.open("w", encoding="utf-8") as f:
        for (pi, si), pred, x, v in zip(keys, predictions, found, verdicts, strict=True):
            correct[pi][si] = v.correct
            rec = completions[(pi, si)]
            row = {
                "problem_index": pi,
                "sample_index": si,
                "gold": problems[pi].answer,
                "prediction": pred,
                "answer_source": x.source if x else None,
                "correct": v.correct,
                "judge": v.judge,
                "finish_reason": rec["finish_reason"],
                "num_tokens": rec["num_tokens"],
            }
            if v.detail:
                row["judge_detail"] = v.detail
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    n = len(keys)
    num_fallback_answers = sum(x is not None and x.source != SOURCE_BOXED for x in found)
    metrics = {
        f"avg@{num_samples}": avg_at_k(correct),
        "pass@k": {str(k): mean_pass_at_k(correct, k) for k in default_ks(num_samples)},
        "num_problems": len(problems),
        "samples_per_problem": num_samples,
        "num_samples": n,
        "no_answer_fraction": sum(v.judge == JUDGE_NO_ANSWER for v in verdicts) / n,
        "fallback_answer_fraction": num_fallback_answers / n,
        "truncated_fraction": sum(completions[k]["finish_reason"] == "length" for k in keys) / n,
        "fallback_judged_fraction": sum(v.judge == JUDGE_FALLBACK for v in verdicts) / n,
        "mean_completion_tokens": sum(completions[k]["num_tokens"] for k in keys) / n,
    }
    return metrics


def average_metrics(per_benchmark: dict[str, dict], num_samples: int) -> dict:
    """Unweighted mean over benchmarks of avg@k, pass@k and the fractions."""
    vals = list(per_benchmark.values())
    avg_key = f"avg@{num_samples}"
    fractions = (
        "no_answer_fraction",
        "fallback_answer_fraction",
        "truncated_fraction",
        "fallback_judged_fraction",
    )
    out = {
        "num_benchmarks": len(vals),
        avg_key: sum(v[avg_key] for v in vals) / len(vals),
        "pass@k": {k: sum(v["pass@k"][k] for v in vals) / len(vals) for k in vals[0]["pass@k"]},
    }
    out.update({f: sum(v[f] for v in vals) / len(vals) for f in fractions})
    return out


def run_evaluation(
    backend: GenerationBackend,
    benchmarks: dict[str, Path],
    output_dir: str | Path,
    config: EvalConfig,
) -> dict:
    """Generate, judge and summarize every benchmark; writes `results.json` and returns it."""
    config.validate()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": backend.model_id,
        "prompt_template": config.prompt_template,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    _check_generation_settings(output_dir, settings)
    loaded = {}
    for name, path in benchmarks.items():  # read them all first: a bad file fails fast
        problems = load_benchmark(path, config.problem_key, config.answer_key)
        if config.max_problems is not None and len(problems) > config.max_problems:
            logger.info("%s: first %d of %d problems", name, config.max_problems, len(problems))
            problems = problems[: config.max_problems]
        loaded[name] = problems
    per_benchmark: dict[str, dict] = {}
    hard_timeout = 4.0 * config.judge_timeout_s
    with EquivalenceJudge(config.judge_workers, config.judge_timeout_s, hard_timeout) as judge:
        for name, problems in loaded.items():
            cache = CompletionCache(output_dir / f"{name}.completions.jsonl")
            completions = generate_benchmark(backend, name, problems, cache, config)
            metrics = score_benchmark(
                problems,
                completions,
                config.num_samples,
                judge,
                output_dir / f"{name}.samples.jsonl",
                config.answer_extraction,
            )
            metrics["path"] = str(benchmarks[name])
            per_benchmark[name] = metrics
            logger.info(
                "%s: avg@%d %.4f", name, config.num_samples, metrics[f"avg@{config.num_samples}"]
            )
    results = {
        "settings": {**settings, **dataclasses.asdict(config), "backend": type(backend).__name__},
        "benchmarks": per_benchmark,
        "average": average_metrics(per_benchmark, config.num_samples),
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_results_table(results: dict) -> str:
    """A plain-text table of the results in percent (the paper's unit), and the answer
    extraction that scored them."""
    k = results["settings"]["num_samples"]
    avg_key = f"avg@{k}"
    ks = list(results["average"]["pass@k"])
    header = ["benchmark", "problems", avg_key] + [f"pass@{x}" for x in ks] + ["no-answer"]
    rows = []
    for name, m in results["benchmarks"].items():
        rows.append(
            [name, str(m["num_problems"]), f"{100 * m[avg_key]:.1f}"]
            + [f"{100 * m['pass@k'][x]:.1f}" for x in ks]
            + [f"{100 * m['no_answer_fraction']:.1f}"]
        )
    a = results["average"]
    rows.append(
        ["average", "", f"{100 * a[avg_key]:.1f}"]
        + [f"{100 * a['pass@k'][x]:.1f}" for x in ks]
        + [f"{100 * a['no_answer_fraction']:.1f}"]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    extraction = f"answer extraction: {results['settings']['answer_extraction']}"
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), extraction])
