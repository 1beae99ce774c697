"""The evaluation runner end to end: a 3-problem benchmark, k=2, the tiny model on CPU.

Two of the six (problem, sample) completions are written into the cache by hand (one right,
one wrong answer), so the results hold known values; the tiny random model generates the
other four (it writes no box: no answer). Reference values are hand-computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from dft_megatron.eval.backends import TransformersBackend
from dft_megatron.eval.prompts import get_prompt_template
from dft_megatron.eval.runner import (
    CacheMismatchError,
    EvalConfig,
    format_results_table,
    run_evaluation,
)

REPO = Path(__file__).resolve().parents[2]

# Qwen2.5-Math layouts: math500-style `problem`/`answer`, olympiadbench-style
# `question`/`final_answer` (a list of `$...$`), minerva-style answer inside `solution`.
ROWS = [
    {"problem": "What is one half plus zero?", "answer": "\\frac{1}{2}"},
    {"question": "How many sides does a triangle have?", "final_answer": ["$3$"]},
    {"problem": "Compute two times five.", "solution": "Two times five is $\\boxed{10}$."},
]


class CountingBackend(TransformersBackend):
    """The real transformers backend, counting its generate calls and prompts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.prompts = 0

    def generate(self, prompts, sampling, *, seed, add_special_tokens):
        self.calls += 1
        self.prompts += len(prompts)
        return super().generate(prompts, sampling, seed=seed, add_special_tokens=add_special_tokens)


def _write_bench(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


SEEDED = [
    (0, 0, "Half of one is $0.5$, i.e. $\\boxed{\\dfrac{1}{2}}$."),  # right
    (1, 1, "A triangle has \\boxed{4} sides."),  # wrong
]


def _seed_cache(out: Path, tokenizer, config: EvalConfig, records=SEEDED) -> None:
    """Hand-written (problem, sample, completion) records, by default (problem 0, sample 0)
    and (problem 1, sample 1), then a torn last line."""
    template = get_prompt_template(config.prompt_template)

    def sha(i):
        return hashlib.sha1(
            template.render(ROWS[i].get("problem") or ROWS[i]["question"], tokenizer).encode()
        ).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    with (out / "tiny.completions.jsonl").open("w") as f:
        for pi, si, text in records:
            rec = {
                "problem_index": pi,
                "sample_index": si,
                "prompt_sha1": sha(pi),
                "completion": text,
                "finish_reason": "stop",
                "num_tokens": 10,
            }
            f.write(json.dumps(rec) + "\n")
        f.write('{"problem_index": 2, "sample_')  # a torn last line from an interrupted write


def test_runner_end_to_end_with_resume(tmp_path, tiny_model, tiny_tokenizer):
    bench = _write_bench(tmp_path)
    out = tmp_path / "out"
    config = EvalConfig(num_samples=2, max_new_tokens=6, batch_size=3, judge_workers=1)
    _seed_cache(out, tiny_tokenizer, config)

    backend = CountingBackend(tiny_model, tiny_tokenizer, model_id="tiny")
    results = run_evaluation(backend, {"tiny": bench}, out, config)
    assert backend.prompts == 4  # 6 pairs, 2 cached
    assert backend.calls == 2  # batches of 3: 3 + 1

    m = results["benchmarks"]["tiny"]
    # Per problem: [right, none] -> 1/2; [none, wrong] -> 0; [none, none] -> 0.
    assert m["avg@2"] == pytest.approx(1 / 6, abs=1e-12)
    assert m["pass@k"] == {
        "1": pytest.approx(1 / 6, abs=1e-12),
        "2": pytest.approx(1 / 3, abs=1e-12),
    }
    assert m["num_problems"] == 3 and m["num_samples"] == 6 and m["samples_per_problem"] == 2
    assert m["no_answer_fraction"] == pytest.approx(4 / 6, abs=1e-12)
    assert m["fallback_judged_fraction"] == 0.0
    assert results["average"]["avg@2"] == m["avg@2"]

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["benchmarks"]["tiny"]["avg@2"] == m["avg@2"]
    samples = [json.loads(x) for x in (out / "tiny.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    assert samples[0]["prediction"] == "\\dfrac{1}{2}" and samples[0]["correct"]
    assert samples[3]["gold"] == "3" and samples[3]["prediction"] == "4"
    assert samples[4]["gold"] == "10"  # minerva-style: the box of the solution
    cached = (out / "tiny.completions.jsonl").read_text().splitlines()
    assert len(cached) == 6  # the torn line was cut, 4 appended

    table = format_results_table(results)
    assert "tiny" in table and "16.7" in table and "average" in table

    # Resume: everything is cached, nothing is generated, the results are the same.
    again = CountingBackend(tiny_model, tiny_tokenizer, model_id="tiny")
    results2 = run_evaluation(again, {"tiny": bench}, out, config)
    assert again.calls == 0
    assert results2["benchmarks"]["tiny"] == results["benchmarks"]["tiny"]

    # More samples: only the new ones are generated.
    more = CountingBackend(tiny_model, tiny_tokenizer, model_id="tiny")
    config3 = EvalConfig(num_samples=3, max_new_tokens=6, batch_size=8, judge_workers=1)
    results3 = run_evaluation(more, {"tiny": bench}, out, config3)
    assert more.prompts == 3 and more.calls == 1
    assert results3["benchmarks"]["tiny"]["num_samples"] == 9


def test_runner_names_the_answer_extraction_and_rescores_with_it(
    tmp_path, tiny_model, tiny_tokenizer
):
    """All three completions are cached, two without a complete box: strict extraction
    scores one right answer, the harness fallback three, from the same cache."""
    bench = _write_bench(tmp_path)
    out = tmp_path / "out"
    strict = EvalConfig(num_samples=1, judge_workers=1)
    records = [
        (0, 0, "Half of one is $\\boxed{\\frac{1}{2}.}$"),  # right either way
        (1, 0, "Count the sides: the answer is $3$."),
        (2, 0, "Two times five is \\boxed{10"),  # cut off inside the box
    ]
    _seed_cache(out, tiny_tokenizer, strict, records)
    backend = CountingBackend(tiny_model, tiny_tokenizer, model_id="tiny")

    boxed = run_evaluation(backend, {"tiny": bench}, out, strict)
    assert boxed["settings"]["answer_extraction"] == "boxed"
    m = boxed["benchmarks"]["tiny"]
    assert m["avg@1"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["no_answer_fraction"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["fallback_answer_fraction"] == 0.0
    assert "answer extraction: boxed" in format_results_table(boxed)

    loose_config = dataclasses.replace(strict, answer_extraction="boxed+harness-fallback")
    loose = run_evaluation(backend, {"tiny": bench}, out, loose_config)
    assert backend.calls == 0  # rescored from the cache
    m = loose["benchmarks"]["tiny"]
    assert m["avg@1"] == 1.0 and m["no_answer_fraction"] == 0.0
    assert m["fallback_answer_fraction"] == pytest.approx(2 / 3, abs=1e-12)
    assert loose["average"]["fallback_answer_fraction"] == m["fallback_answer_fraction"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["settings"]["answer_extraction"] == "boxed+harness-fallback"
    assert "answer extraction: boxed+harness-fallback" in format_results_table(loose)
    samples = [json.loads(x) for x in (out / "tiny.samples.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["answer_source"]) for r in samples] == [
        ("\\frac{1}{2}.", "boxed"),
        ("3", "answer_is"),
        ("10", "unclosed_box"),
    ]

    with pytest.raises(ValueError, match="answer_extraction must be one of boxed, "):
        run_evaluation(backend, {"tiny": bench}, out, EvalConfig(answer_extraction="loose"))


def test_runner_refuses_a_cache_from_other_settings(tmp_path, tiny_model, tiny_tokenizer):
    bench = _write_bench(tmp_path)
    out = tmp_path / "out"
    backend = TransformersBackend(tiny_model, tiny_tokenizer, model_id="tiny")
    config = EvalConfig(num_samples=1, max_new_tokens=2, max_problems=1, judge_workers=1)
    run_evaluation(backend, {"tiny": bench}, out, config)
    hotter = EvalConfig(num_samples=1, max_new_tokens=2, temperature=0.7, judge_workers=1)
    with pytest.raises(CacheMismatchError, match="temperature: cached 1.0, now 0.7"):
        run_evaluation(backend, {"tiny": bench}, out, hotter)
    # Same settings, but the benchmark's first problem changed: its prompt hash differs.
    bench.write_text(json.dumps({"problem": "Another problem", "answer": "1"}) + "\n")
    with pytest.raises(CacheMismatchError, match="another prompt"):
        run_evaluation(backend, {"tiny": bench}, out, config)


def test_cli_on_a_saved_model(tmp_path, tiny_model, tiny_tokenizer, capsys):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    bench_dir = tmp_path / "benchmarks"
    (bench_dir / "tiny").mkdir(parents=True)
    (bench_dir / "tiny" / "test.jsonl").write_text(_write_bench(tmp_path).read_text())

    spec = importlib.util.spec_from_file_location("eval_math", REPO / "tools" / "eval_math.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [
        "--model", str(model_dir),
        "--benchmarks", str(bench_dir),
        "--output-dir", str(tmp_path / "out"),
        "--prompt-template", "base",
        "--num-samples", "2",
        "--max-new-tokens", "4",
        "--max-problems", "2",
        "--backend", "auto",
        "--judge-workers", "1",
        "--answer-fallback",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "avg@2" in printed and "tiny" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["backend"] == "TransformersBackend"  # no vLLM / GPU here
    assert results["benchmarks"]["tiny"]["num_problems"] == 2
    assert results["settings"]["answer_extraction"] == "boxed+harness-fallback"
    assert cli.main([*argv[:2], "--benchmarks", "bad", *argv[4:]]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
