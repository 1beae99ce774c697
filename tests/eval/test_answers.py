"""Answer extraction and equivalence on a table of tricky cases.

References: the expected values are hand-written (what a grader of the MATH benchmark
accepts). Equivalence runs the real math_verify; the fallback is tested on its own and
through the worker pool's hard timeout on an input that math_verify cannot finish. The
trailing-period, whitespace and answer-fallback cases are the ways the Qwen2.5-Math
harness's verdicts differed from ours (its verdicts are the references there).
"""

from __future__ import annotations

import time

import pytest

from dft_megatron.eval.answers import (
    JUDGE_FALLBACK,
    JUDGE_MATH_VERIFY,
    JUDGE_NO_ANSWER,
    SOURCE_ANSWER_IS,
    SOURCE_BOXED,
    SOURCE_LAST_NUMBER,
    SOURCE_UNCLOSED_BOX,
    EquivalenceJudge,
    Extraction,
    Judgement,
    canonical_answer,
    extract_answer,
    extract_boxed_answer,
    judge_answer,
    locate_answer,
    normalize_answer,
    normalized_equal,
)

EXTRACTION_CASES = [
    # (completion, expected answer)
    ("So the answer is $\\boxed{5}$.", "5"),
    ("First $\\boxed{3}$, then on reflection $\\boxed{4}$.", "4"),  # last box wins
    ("No box here, the answer is 7.", None),
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("The answer is $\\boxed 5$.", "5"),  # brace-less
    ("Thus \\boxed 12.", "12"),
    ("$\\fbox{-3}$", "-3"),
    ("$\\boxed{x}$ and $\\fbox{y}$", "y"),
    ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),  # escaped braces are content
    ("$\\boxed{(1,2]}$", "(1,2]"),
    ("$\\boxed{5}$ then cut off: \\boxed{\\frac{1}{", "5"),  # unclosed last box does not count
    ("$\\boxed{}$", None),  # empty box
    ("$\\boxed{ 42 }$", "42"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("\\boxedfoo{3}", None),  # not a box command
    ("$\\boxed{\\boxed{8}}$", "8"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


EQUIVALENT = [
    # (gold, prediction)
    ("\\frac{1}{2}", "1/2"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\frac12", "\\tfrac{1}{2}"),
    ("5", "5\\text{ cm}"),
    ("5", "5 \\text{cm}"),
    ("90^\\circ", "90"),
    ("90", "90^{\\circ}"),
    ("(1,2]", "(1, 2]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("-3", "-3"),
    ("50", "50\\%"),
    ("10000", "10\\!000"),
    ("27.0", "27"),  # amc23's gold answers are floats
    ("x=3", "3"),
    ("p - q", "p-q"),
    ("6 - 5i", "6-5i"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("(1,2]", "[1,2)"),  # interval ends matter
    ("(1,2)", "(2,1)"),  # an open interval is not the tuple (2, 1)
    ("-3", "3"),  # sign matters
    ("50", "0.5"),
    ("\\sqrt{51}", "\\sqrt{5}"),
    ("5", "6\\text{ cm}"),
]


@pytest.mark.parametrize(("gold", "pred"), EQUIVALENT)
def test_equivalent_by_math_verify(gold, pred):
    verdict = judge_answer(gold, pred)
    assert verdict.correct, verdict
    assert verdict.judge == JUDGE_MATH_VERIFY, verdict


@pytest.mark.parametrize(("gold", "pred"), NOT_EQUIVALENT)
def test_not_equivalent_by_math_verify(gold, pred):
    verdict = judge_answer(gold, pred)
    assert not verdict.correct, verdict
    assert verdict.judge == JUDGE_MATH_VERIFY, verdict


# Judged wrong before, right by the harness: a trailing period, whitespace inside LaTeX.
HARNESS_EQUIVALENT = [
    ("10", "10."),  # `\boxed{10.}`
    ("10", "10. "),
    ("\\frac{1}{2}", "0.5."),
    ("\\pi", "\\pi ."),
    ("e^{2it}", "e^{2 i t}"),
    ("e^{2it}", "e^{2\\,i\\,t}"),
    ("12", "1 2"),  # the harness strips every space
    ("1000000", "1 000 000"),
]

# Must stay wrong: decimals keep their point, spacing does not hide a difference.
HARNESS_NOT_EQUIVALENT = [
    ("10", "10.5"),
    ("5", ".5"),
    ("10", "100."),
    ("12", "1.2"),
    ("e^{2it}", "e^{-2 i t}"),
    ("\\pi r^2", "\\pi^2 r"),
]


@pytest.mark.parametrize(("gold", "pred"), HARNESS_EQUIVALENT)
def test_equivalent_up_to_trailing_period_and_spaces(gold, pred):
    verdict = judge_answer(gold, pred)
    assert verdict.correct, verdict
    assert verdict.judge == JUDGE_MATH_VERIFY, verdict


@pytest.mark.parametrize(("gold", "pred"), HARNESS_NOT_EQUIVALENT)
def test_not_equivalent_despite_trailing_period_and_spaces(gold, pred):
    verdict = judge_answer(gold, pred)
    assert not verdict.correct, verdict
    assert verdict.judge == JUDGE_MATH_VERIFY, verdict


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("10.", "10"),
        ("10. . ", "10"),
        ("10.5", "10.5"),  # a decimal point is not a trailing period
        (".5", ".5"),
        ("\\frac {1} {2}", "\\frac{1}{2}"),
        ("x ^ 2 + 1", "x^2+1"),
        ("10\\,000\\quad", "10000"),
        ("10.\\quad", "10"),  # the period is trailing once the spacing is gone
        ("2 \\pi\\, r", "2\\pi r"),  # TeX needs the space between `\\pi` and `r`
        ("\\sin  x", "\\sin x"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("5 \\text{ square  feet }", "5\\text{ square feet }"),  # words stay apart
        ("\\text{no\nsolution}", "\\text{no solution}"),
    ],
)
def test_canonical_answer(raw, canonical):
    assert canonical_answer(raw) == canonical


def test_no_answer_is_wrong():
    assert judge_answer("5", None).judge == JUDGE_NO_ANSWER
    assert not judge_answer("5", None).correct


def test_end_to_end_completion_to_verdict():
    completion = "We get $x = \\dfrac{2}{4}$, so \\boxed{\\dfrac{1}{2}}. Hmm, \\boxed{0.5}."
    assert judge_answer("\\frac{1}{2}", extract_boxed_answer(completion)).correct
    assert judge_answer("10", extract_boxed_answer("Hence $\\boxed{10.}$")).correct


FALLBACK_CASES = [
    # (completion, answer with fallback=True, its source); strict extraction finds none.
    ("We get \\boxed{\\frac{1}{2", "\\frac{1}{2", SOURCE_UNCLOSED_BOX),  # cut off in the box
    ("The answer is $\\boxed{5", "5", SOURCE_UNCLOSED_BOX),  # the box before the phrase
    ("So the answer is $\\frac{1}{2}$. Done.", "\\frac{1}{2}", SOURCE_ANSWER_IS),
    ("Therefore, the final answer is: 42.\nCheck: 6 * 7 = 42.", "42", SOURCE_ANSWER_IS),
    ("The answer is 3.5. Check: 7 / 2, 2 people.", "3.5", SOURCE_ANSWER_IS),  # not the last 2
    ("The answer is\n\n$$12$$", "12", SOURCE_ANSWER_IS),
    ("I got 3, then -4/5.", "-4/5", SOURCE_LAST_NUMBER),
    ("It costs 1,250 dollars", "1250", SOURCE_LAST_NUMBER),
    ("so x is .5", ".5", SOURCE_LAST_NUMBER),
]


@pytest.mark.parametrize(("text", "answer", "source"), FALLBACK_CASES)
def test_harness_fallback_extraction(text, answer, source):
    assert locate_answer(text, fallback=True) == Extraction(answer, source)
    assert extract_answer(text, fallback=True) == answer
    assert extract_answer(text) is None  # the strict default: no box, no answer
    assert locate_answer(text) is None


@pytest.mark.parametrize(
    "text",
    ["The answer is 3, so \\boxed{4}.", "\\boxed{4} then \\boxed{\\frac{1}{2"],
)
def test_a_complete_box_wins_with_or_without_fallback(text):
    assert locate_answer(text) == Extraction("4", SOURCE_BOXED)
    assert locate_answer(text, fallback=True) == Extraction("4", SOURCE_BOXED)


@pytest.mark.parametrize("text", ["No numbers here.", "the answer is ."])
def test_fallback_finds_nothing_without_a_candidate(text):
    assert extract_answer(text, fallback=True) is None


def test_fallback_answer_end_to_end():
    completion = "Half of one is one half, so the answer is $\\dfrac{1}{2}$."
    assert not judge_answer("\\frac{1}{2}", extract_answer(completion)).correct
    assert judge_answer("\\frac{1}{2}", extract_answer(completion, fallback=True)).correct


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("5\\text{ cm}", "5"),
        ("90^{\\circ}", "90"),
        ("50\\%", "50"),
        ("10\\!000", "10000"),
        ("\\left( 1, 2 \\right]", "(1,2]"),
        ("x = 3", "3"),
        ("\\frac12", "\\frac{1}{2}"),
        ("10,000", "10000"),
        ("1,2", "1,2"),  # a tuple keeps its comma
        ("$-7$.", "-7"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize(
    ("gold", "pred", "equal"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{1}{2}", "1/2", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("5", "5\\text{ cm}", True),
        ("90^\\circ", "90", True),
        ("(1,2]", "\\left(1, 2\\right]", True),
        ("-3", "3", False),
        ("\\frac{1}{2}", "\\frac{1}{3}", False),
        ("(1,2]", "[1,2)", False),
        ("5", "", False),
    ],
)
def test_fallback_normalized_equal(gold, pred, equal):
    assert normalized_equal(gold, pred) is equal


def slow_judge(gold: str, prediction: str, timeout_seconds: int) -> Judgement:
    """math_verify's verdict, except for the prediction `hang`, which never returns in time.

    Stands in for the rare input that keeps sympy busy in C code where math_verify's
    `signal.alarm` cannot interrupt it (none was found among the usual suspects: huge powers,
    factorials and binomials all stop at the alarm).
    """
    if prediction == "hang":
        time.sleep(600)
    return judge_answer(gold, prediction, timeout_seconds)


def test_judge_pool_kills_a_hung_worker_and_falls_back():
    pairs = [
        ("\\frac{1}{2}", "0.5"),
        ("hang", "hang"),
        ("3", None),
        ("-3", "3"),
        ("7", "7"),
    ]
    start = time.monotonic()
    # 8 s: generous for a loaded machine (the other pairs take well under a second each).
    with EquivalenceJudge(2, timeout_seconds=2, hard_timeout_s=8.0, judge_fn=slow_judge) as judge:
        verdicts = judge.judge_many(pairs)
        assert judge.num_killed == 1
    assert time.monotonic() - start < 120
    assert [v.judge for v in verdicts] == [
        JUDGE_MATH_VERIFY,
        JUDGE_FALLBACK,  # killed: the fallback's string comparison says equal
        JUDGE_NO_ANSWER,
        JUDGE_MATH_VERIFY,
        JUDGE_MATH_VERIFY,
    ]
    assert [v.correct for v in verdicts] == [True, True, False, False, True]
    assert "killed" in verdicts[1].detail


def test_math_verify_timeout_goes_to_the_fallback():
    """A factorial with millions of digits: math_verify's own 1 s alarm stops it."""
    verdict = judge_answer("5000000!", "1", timeout_seconds=1)
    assert verdict.judge == JUDGE_FALLBACK and "timeout" in verdict.detail
    assert not verdict.correct
