"""The reproduction's helpers: offline-RL rows from a judged evaluation, and its table."""

from __future__ import annotations

import json

from dft_megatron.eval.comparison import format_table, main, reward_rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reward_rows_join_completions_verdicts_and_problems(tmp_path, capsys):
    problems = [{"problem": "1 + 1?", "answer": "2"}, {"problem": "2 + 2?", "answer": "4"}]
    _write(tmp_path / "p.jsonl", problems)
    texts = {(0, 0): "It is \\boxed{2}.", (0, 1): "  ", (1, 0): "\\boxed{5}", (1, 1): "\\boxed{4}"}
    _write(
        tmp_path / "r.completions.jsonl",
        [{"problem_index": p, "sample_index": s, "completion": t} for (p, s), t in texts.items()],
    )
    _write(
        tmp_path / "r.samples.jsonl",
        [
            {"problem_index": 0, "sample_index": 0, "correct": True},
            {"problem_index": 0, "sample_index": 1, "correct": False},
            {"problem_index": 1, "sample_index": 0, "correct": False},
            {"problem_index": 1, "sample_index": 1, "correct": True},
        ],
    )
    counts = reward_rows(tmp_path / "r", tmp_path / "p.jsonl", tmp_path / "out.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [
        {"problem": "1 + 1?", "solution": "It is \\boxed{2}.", "reward": 1.0},
        {"problem": "2 + 2?", "solution": "\\boxed{5}", "reward": 0.0},
        {"problem": "2 + 2?", "solution": "\\boxed{4}", "reward": 1.0},
    ]
    assert counts == {
        "samples": 4,
        "rows": 3,
        "accepted": 2,
        "empty_samples_left_out": 1,
        "problems_with_an_accepted_sample": 2,
    }
    assert "empty_samples_left_out" in capsys.readouterr().out


def test_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "r.completions.jsonl").write_text("{bad\n")
    assert main(["rewards", "--rollouts", str(tmp_path / "r"), "--problems", "x", "--output",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert f"{tmp_path / 'r.completions.jsonl'}:1: not JSON" in capsys.readouterr().err


def test_table_shows_accuracy_and_regime_change():
    results = {
        "num_samples": 4,
        "methods": {
            "dft": {
                "heldout_avg@4": 0.25,
                "heldout_pass@4": 0.5,
                "regimes_first": {"p<0.01": 0.2, "p>0.99": 0.1, "target_prob_mean": 0.4},
                "regimes_last": {"p<0.01": 0.3, "p>0.99": 0.4, "target_prob_mean": 0.6},
            }
        },
    }
    table = format_table(results)
    assert "25.0%" in table and "50.0%" in table and "0.100 -> 0.400" in table
