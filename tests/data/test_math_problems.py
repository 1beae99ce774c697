"""Generated math problems: every answer and every step re-checked with exact arithmetic.

Reference: an independent evaluator of the LaTeX the generator writes (integers, +, -,
\\times, \\frac{}{}, parentheses) over `fractions.Fraction`, so every check is exact.
"""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction

import pytest

from dft_megatron.data.math_problems import (
    KINDS,
    generate_problem,
    generate_splits,
    iter_unique_problems,
)

BOXED = re.compile(r"The answer is \\boxed\{(.*)\}\.$")
MATH = re.compile(r"\$([^$]+)\$")
FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")


def evaluate(latex: str, x: Fraction | None = None) -> Fraction:
    """The exact value of a LaTeX expression; `x` substitutes the variable x."""
    text = latex.replace("\\times", "*")
    while FRAC.search(text):
        text = FRAC.sub(r"((\1)/(\2))", text)
    if x is not None:
        text = re.sub(r"(\d)x", r"\1*(x)", text)
    tree = ast.parse(text.strip(), mode="eval")

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.Name) and node.id == "x" and x is not None:
            return x
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            ops = {
                ast.Add: a.__add__,
                ast.Sub: a.__sub__,
                ast.Mult: a.__mul__,
                ast.Div: a.__truediv__,
            }
            return ops[type(node.op)](b)
        raise ValueError(f"not an expression the generator writes: {latex!r}")

    return walk(tree)


def is_numeric(side: str) -> bool:
    return re.search(r"[a-zA-Z]", FRAC.sub("", side.replace("\\times", "").strip())) is None


def check_row(row: dict) -> None:
    boxed = BOXED.search(row["solution"].splitlines()[-1])
    assert boxed, row["solution"]
    assert boxed.group(1) == row["answer"]
    answer = evaluate(row["answer"])

    # Every equation chain in the solution holds exactly.
    last_value = None
    for segment in MATH.findall(row["solution"]):
        values = [evaluate(side) for side in segment.split("=") if is_numeric(side)]
        assert all(v == values[0] for v in values), segment
        if values:
            last_value = values[-1]
    assert last_value == answer, row

    # The answer solves the problem, computed from the problem text alone.
    expression = MATH.findall(row["problem"])
    if row["kind"] in ("arithmetic", "fractions"):
        assert evaluate(expression[0]) == answer, row["problem"]
    elif row["kind"] == "linear":
        lhs, rhs = expression[1].split("=")
        assert evaluate(lhs, x=answer) == evaluate(rhs, x=answer), row["problem"]
    # Answers are in lowest terms, integers when whole.
    assert row["answer"] == (
        str(answer.numerator)
        if answer.denominator == 1
        else f"{'-' if answer < 0 else ''}\\frac{{{abs(answer.numerator)}}}{{{answer.denominator}}}"
    )


@pytest.fixture(scope="module")
def splits():
    return generate_splits(train_size=800, test_size=200, seed=7)


def test_every_answer_and_step_is_exact(splits):
    train, test = splits
    for row in train + test:
        check_row(row)


def test_the_checker_catches_a_wrong_answer(splits):
    row = dict(splits[0][0])
    wrong = str(evaluate(row["answer"]) + 1)
    row["solution"] = row["solution"].replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{wrong}}}")
    row["answer"] = wrong
    with pytest.raises(AssertionError):
        check_row(row)


def test_every_kind_at_every_difficulty_checks_out():
    import random

    rng = random.Random(0)
    for kind in KINDS:
        for difficulty in ("easy", "medium", "hard"):
            for _ in range(30):
                check_row(generate_problem(rng, kind, difficulty).to_row())


def test_splits_are_disjoint_balanced_and_harder(splits):
    train, test = splits
    assert len(train) == 800 and len(test) == 200
    assert {r["difficulty"] for r in train} == {"easy", "medium"}
    assert {r["difficulty"] for r in test} == {"hard"}
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert len({r["problem"] for r in train}) == len(train)
    assert len({r["problem"] for r in test}) == len(test)
    for rows in (train, test):
        kinds = [r["kind"] for r in rows]
        assert all(kinds.count(k) == len(rows) // len(KINDS) for k in KINDS)

    def mean_steps(rows):
        return sum(r["solution"].count("\n") for r in rows) / len(rows)

    assert mean_steps(test) > 1.3 * mean_steps(train)


def test_deterministic_by_seed(splits):
    again = generate_splits(train_size=800, test_size=200, seed=7)
    assert json.dumps(again) == json.dumps(splits)
    other = generate_splits(train_size=800, test_size=200, seed=8)
    assert other[0][0] != splits[0][0]


def test_exhausted_ranges_raise():
    # Easy fractions have a few hundred distinct problems; asking for more must fail loudly.
    stream = iter_unique_problems(0, ("easy",), max_attempts_per_row=5)
    with pytest.raises(RuntimeError, match="exhausted"):
        for _ in range(10_000):
            next(stream)


def test_kinds_and_difficulties_can_be_chosen():
    """The reproduction's data: two kinds, an in-distribution held-out split (same difficulty,
    still no shared problem)."""
    train, test = generate_splits(
        300, 40, seed=3, kinds=("arithmetic", "linear"), train_difficulties=("easy",),
        test_difficulties=("easy",),
    )  # fmt: skip
    for rows in (train, test):
        assert {r["kind"] for r in rows} == {"arithmetic", "linear"}
        assert {r["difficulty"] for r in rows} == {"easy"}
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    with pytest.raises(ValueError, match="unknown problem kind 'geometry'"):
        generate_splits(10, 2, seed=3, kinds=("geometry",))
    with pytest.raises(ValueError, match="unknown difficulty 'extreme'"):
        generate_splits(10, 2, seed=3, test_difficulties=("extreme",))
