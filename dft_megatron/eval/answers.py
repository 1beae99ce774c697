"""Final-answer extraction and mathematical equivalence, as in the DFT paper's evaluation.

Extraction: the final answer is the content of the LAST complete, non-empty `\\boxed{...}`
(or `\\fbox{...}`) in a completion; braces nest (`\\boxed{\\frac{\\sqrt{2}}{2}}`), escaped braces
`\\{ \\}` do not count, and the brace-less form `\\boxed 5` takes the next token. A box that is
never closed (a completion cut off at the token limit) or that is empty does not count. No box:
no answer (the sample is wrong). That is the strict default, `ANSWER_EXTRACTION_BOXED`.

`ANSWER_EXTRACTION_FALLBACK` (`extract_answer(text, fallback=True)`) reads such completions
the way the Qwen2.5-Math evaluation harness (the paper's) does instead: when there is no
complete box, the answer is the content of an unclosed last box (to the end of the text),
else the text after the last "the answer is" (to the end of its sentence or line), else the
last number in the text; that is the harness's order (its `extract_answer` reads a box, even
an unclosed one, before the phrase). `locate_answer` also says which source gave it.

Comparison: both answers are first brought to `canonical_answer`: a trailing period dropped
(`\\boxed{10.}` is 10, `10.5` and `.5` keep theirs) and whitespace and LaTeX spacing commands
removed outside `\\text{}`-like groups (`e^{2 i t}` is `e^{2it}`, `1 2` is `12`), as the
harness strips spaces before it compares; inside text groups whitespace separates words and
is only collapsed.

Equivalence (`judge_answer`): `math_verify` parses the canonical gold answer and prediction
(both wrapped in `\\boxed{}`, so its LaTeX extraction reads exactly that text) into sympy
objects and `math_verify.verify(gold, prediction)` compares them (numbers to 6 decimals,
fractions, radicals, intervals, sets, tuples, matrices, equations `x=3` vs `3`, units in
`\\text{}`, degrees, percent). The normalization fallback (`normalized_equal`: string
normalization plus exact rational comparison of plain numbers, no sympy, so it cannot hang)
judges a pair only when math_verify raises, times out, or extracts nothing from the gold
answer; each `Judgement` says which judge decided (`judge`), and the runner reports the
fraction that the fallback decided.

Timeouts: math_verify bounds its own work with `signal.alarm` (main thread only); Python
delivers the alarm only between bytecodes, so a single long C call would outlive it.
`EquivalenceJudge` therefore runs math_verify in worker processes and kills a worker that
outlives a hard limit; that pair then goes to the fallback.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

logger = logging.getLogger(__name__)

JUDGE_MATH_VERIFY = "math_verify"
JUDGE_FALLBACK = "fallback"
JUDGE_NO_ANSWER = "no_answer"

ANSWER_EXTRACTION_BOXED = "boxed"
ANSWER_EXTRACTION_FALLBACK = "boxed+harness-fallback"
ANSWER_EXTRACTIONS = (ANSWER_EXTRACTION_BOXED, ANSWER_EXTRACTION_FALLBACK)

# Where an extracted answer came from (`Extraction.source`).
SOURCE_BOXED = "boxed"
SOURCE_UNCLOSED_BOX = "unclosed_box"
SOURCE_ANSWER_IS = "answer_is"
SOURCE_LAST_NUMBER = "last_number"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"\b(?:the|final)\s+answer\s+is\b\s*:?", re.IGNORECASE)
_DELIMITED_MATH_RE = re.compile(r"(?:\$\$?|\\[(\[])(.+?)(?:\$|\\[)\]])")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_NUMBER_RE = re.compile(r"-?(?:\d+/\d+|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_TRAILING_PERIOD_RE = re.compile(r"(?<!\\)[.\s]+$")


@dataclass(frozen=True)
class Extraction:
    """An answer found in a completion, and where it was found (a `SOURCE_*`)."""

    answer: str
    source: str


def _balanced_group(text: str, open_at: int) -> str | None:
    """Content of the `{...}` group opening at `text[open_at]`; None if it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # an escaped brace is content, not a group delimiter
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def _skip_blanks(text: str, i: int) -> int:
    """The first position at or after `i` that is not a space or tab."""
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def extract_boxed_answers(text: str) -> list[str]:
    """Every complete, non-empty `\\boxed`/`\\fbox` content in `text`, in order of appearance."""
    answers = []
    for match in _BOX_RE.finditer(text):
        i = match.end()
        j = _skip_blanks(text, i)
        if j < len(text) and text[j] == "{":
            content = _balanced_group(text, j)
        elif j > i:
            # `\boxed 5`: TeX takes the next token as the argument.
            token = re.match(r"[^\s$]+", text[j:])
            content = token.group(0).rstrip(".,;") if token else None
        else:
            content = None
        if content is not None and content.strip():
            answers.append(content.strip())
    return answers


def extract_boxed_answer(text: str) -> str | None:
    """The final answer: the last complete, non-empty box in `text`; None when there is none."""
    answers = extract_boxed_answers(text)
    return answers[-1] if answers else None


def _drop_trailing_period(answer: str) -> str:
    """`answer` without trailing periods and whitespace: `10.` -> `10` (`10.5`, `.5` stay).

    Models end a boxed answer with the sentence's period (`\\boxed{10.}`); the harness drops
    it, and math_verify reads `10.` as no number at all.
    """
    return _TRAILING_PERIOD_RE.sub("", answer.strip())


def _clean_loose_answer(answer: str) -> str | None:
    """A fallback answer without its `$` delimiters and trailing period; None if empty."""
    cleaned = _drop_trailing_period(_drop_trailing_period(answer).strip("$"))
    return cleaned or None


def _unclosed_last_box(text: str) -> str | None:
    """The content of the last `\\boxed{` (or `\\fbox{`) when it never closes, to the end."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    j = _skip_blanks(text, matches[-1].end())
    if j >= len(text) or text[j] != "{" or _balanced_group(text, j) is not None:
        return None
    return _clean_loose_answer(text[j + 1 :])


def _answer_is_phrase(text: str) -> str | None:
    """What follows the last "the answer is" (or "final answer is"): the delimited math
    right after it (`$...$`, `\\(...\\)`), else the rest of its sentence or line."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    line = text[matches[-1].end() :].lstrip().split("\n", 1)[0]
    math = _DELIMITED_MATH_RE.match(line)
    phrase = math.group(1) if math else _SENTENCE_END_RE.split(line, maxsplit=1)[0]
    return _clean_loose_answer(phrase)


def _last_number(text: str) -> str | None:
    """The last integer, decimal or simple fraction (`-3`, `1,000`, `2.5`, `3/4`) in `text`."""
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def locate_answer(text: str, fallback: bool = False) -> Extraction | None:
    """The final answer of a completion and its source; None when there is none.

    The last complete box first. Without one, strict extraction (`fallback=False`, this
    project's default) finds no answer; `fallback=True` reads the completion as the
    Qwen2.5-Math harness does: an unclosed last box (a completion cut off inside it), then
    the last "the answer is ...", then the last number in the text.
    """
    boxed = extract_boxed_answer(text)
    if boxed is not None:
        return Extraction(boxed, SOURCE_BOXED)
    if not fallback:
        return None
    for source, find in (
        (SOURCE_UNCLOSED_BOX, _unclosed_last_box),
        (SOURCE_ANSWER_IS, _answer_is_phrase),
        (SOURCE_LAST_NUMBER, _last_number),
    ):
        answer = find(text)
        if answer is not None:
            return Extraction(answer, source)
    return None


def extract_answer(text: str, fallback: bool = False) -> str | None:
    """The final answer of a completion (see `locate_answer`); None when there is none."""
    found = locate_answer(text, fallback)
    return found.answer if found else None


# ---------------------------------------------------------------------------------------------
# Canonical form: what both answers are compared as
# ---------------------------------------------------------------------------------------------

_TEXT_GROUP_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|textnormal|mbox)(?![A-Za-z])\s*\{"
)
_TEX_TOKEN_RE = re.compile(r"\\[A-Za-z]+|\\.|\s+|.", re.DOTALL)
_SPACING_COMMANDS = frozenset(
    {"\\,", "\\!", "\\;", "\\:", "\\>", "\\ ", "\\\t", "\\\n", "\\quad", "\\qquad", "~"}
)
_CONTROL_WORD_RE = re.compile(r"\\[A-Za-z]+")


def _squeeze_spaces(latex: str) -> str:
    """`latex` without whitespace and spacing commands (`\\,` `\\quad` `~` ...), text groups
    (`\\text{...}`, `\\mbox{...}`) kept with their inner whitespace collapsed to one space.

    A space stays where TeX needs it, between a control word and a letter (`\\pi r`, not
    `\\pir`).
    """
    out: list[str] = []
    i = 0
    while i < len(latex):
        text_group = _TEXT_GROUP_RE.match(latex, i)
        if text_group:
            brace = text_group.end() - 1
            content = _balanced_group(latex, brace)
            inner = latex[brace + 1 :] if content is None else content
            closing = "" if content is None else "}"
            token = latex[i:brace] + "{" + re.sub(r"\s+", " ", inner) + closing
            i = brace + 1 + len(inner) + len(closing)
        else:
            token = _TEX_TOKEN_RE.match(latex, i).group(0)
            i += len(token)
            if token.isspace() or token in _SPACING_COMMANDS:
                continue
        if out and token[0].isalpha() and _CONTROL_WORD_RE.fullmatch(out[-1]):
            out.append(" ")
        out.append(token)
    return "".join(out)


def canonical_answer(answer: str) -> str:
    """The form both answers are compared in: spaces squeezed, trailing period dropped.

    The Qwen2.5-Math harness strips a trailing period and every space before it compares;
    so `\\boxed{10.}` is 10, and `e^{2 i t}` is `e^{2it}` (math_verify reads `2 i t` as
    `2 i`). As there, `1 2` is `12`.
    """
    return _drop_trailing_period(_squeeze_spaces(answer))


# ---------------------------------------------------------------------------------------------
# The normalization fallback (no sympy: it must finish on any input)
# ---------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")
_TRAILING_UNIT_RE = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .^0-9]*\}$")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH_RE = re.compile(r"^(-?\d+)/(\d+)$")
_DECIMAL_RE = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer: LaTeX spacing, units, degrees and percent removed."""
    s = answer.strip().rstrip(".").strip()
    s = s.strip("$").replace("\\(", "").replace("\\)", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for cmd in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~"):
        s = s.replace(cmd, "")
    s = s.replace("\\displaystyle", "")
    # A unit after the value: `5\text{ cm}` -> `5` (only when something is left).
    stripped = _TRAILING_UNIT_RE.sub("", s).strip()
    if stripped:
        s = stripped
    s = _TEXT_CMD_RE.sub(r"\1", s)
    for degree in ("^{\\circ}", "^\\circ", "°"):
        s = s.replace(degree, "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = _ASSIGNMENT_RE.sub("", s)  # `x = 3` -> `3`
    s = s.rstrip(".")
    s = "".join(s.split())
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def _as_fraction(s: str) -> Fraction | None:
    """The exact value of a plain number (`-3`, `0.5`, `1/2`, `\\frac{1}{2}`), else None."""
    if _DECIMAL_RE.match(s):
        return Fraction(s)
    m = _SLASH_RE.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _FRAC_RE.match(s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    return None


def normalized_equal(gold: str, prediction: str) -> bool:
    """The fallback judge: equal normalized strings, or equal plain numbers (1e-6 relative)."""
    g, p = normalize_answer(gold), normalize_answer(prediction)
    if not g or not p:
        return False
    if g == p:
        return True
    gv, pv = _as_fraction(g), _as_fraction(p)
    if gv is None or pv is None:
        return False
    return abs(gv - pv) <= Fraction(1, 10**6) * max(1, abs(gv))


# ---------------------------------------------------------------------------------------------
# math_verify
# ---------------------------------------------------------------------------------------------


def math_verify_equal(gold: str, prediction: str, timeout_seconds: int = 5) -> bool | None:
    """math_verify's verdict on two extracted answers; None when it extracts nothing from gold.

    Raises whatever math_verify raises (`raise_on_error=True`), including its
    `TimeoutException` (a BaseException) when its own `timeout_seconds` alarm fires.
    """
    import math_verify

    gold_parsed = math_verify.parse(
        "\\boxed{" + gold + "}", parsing_timeout=timeout_seconds, raise_on_error=True
    )
    if not gold_parsed:
        return None
    pred_parsed = math_verify.parse(
        "\\boxed{" + prediction + "}", parsing_timeout=timeout_seconds, raise_on_error=True
    )
    return bool(
        math_verify.verify(
            gold_parsed, pred_parsed, timeout_seconds=timeout_seconds, raise_on_error=True
        )
    )


@dataclass(frozen=True)
class Judgement:
    """Whether a prediction matches the gold answer, and which judge decided."""

    correct: bool
    judge: str
    """`math_verify`, `fallback` (math_verify raised, timed out or could not read the gold
    answer; `detail` says which) or `no_answer` (no boxed answer in the completion)."""
    detail: str = ""


def judge_answer(gold: str, prediction: str | None, timeout_seconds: int = 5) -> Judgement:
    """Judge one extracted prediction in this process (math_verify first, then the fallback).

    Both answers are compared in their `canonical_answer` form. Runs math_verify's
    `signal.alarm` timeouts, so call it from the main thread; a computation that ignores the
    alarm is only bounded by `EquivalenceJudge`.
    """
    if prediction is None:
        return Judgement(False, JUDGE_NO_ANSWER)
    from math_verify.errors import TimeoutException

    gold, prediction = canonical_answer(gold), canonical_answer(prediction)

    try:
        verdict = math_verify_equal(gold, prediction, timeout_seconds)
    except TimeoutException:
        return Judgement(normalized_equal(gold, prediction), JUDGE_FALLBACK, "math_verify timeout")
    except Exception as e:
        detail = f"math_verify raised {type(e).__name__}: {str(e)[:200]}"
        return Judgement(normalized_equal(gold, prediction), JUDGE_FALLBACK, detail)
    if verdict is None:
        detail = "math_verify extracted nothing from the gold answer"
        return Judgement(normalized_equal(gold, prediction), JUDGE_FALLBACK, detail)
    return Judgement(verdict, JUDGE_MATH_VERIFY)


def _import_math_verify() -> None:
    import math_verify  # noqa: F401


def _judge_in_worker(gold: str, prediction: str, timeout_seconds: int) -> Judgement:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return judge_answer(gold, prediction, timeout_seconds)


class EquivalenceJudge:
    """Judges many (gold, prediction) pairs in worker processes with a hard per-pair timeout.

    A pair whose worker does not answer within `hard_timeout_s` is judged by the fallback and
    the worker pool is replaced (its processes are killed). Use as a context manager.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_seconds: int = 5,
        hard_timeout_s: float = 20.0,
        judge_fn=None,
    ):
        """`judge_fn(gold, prediction, timeout_seconds) -> Judgement` runs in the workers (a
        module-level function, imported there by name); default: `judge_answer`."""
        if hard_timeout_s <= timeout_seconds:
            raise ValueError(
                f"EquivalenceJudge: hard_timeout_s ({hard_timeout_s}) must exceed math_verify's "
                f"own timeout_seconds ({timeout_seconds})"
            )
        self.workers = max(1, workers)
        self.timeout_seconds = timeout_seconds
        self.hard_timeout_s = hard_timeout_s
        self.judge_fn = judge_fn or _judge_in_worker
        self.num_killed = 0
        self.startup_timeout_s = 600.0
        self._ctx = mp.get_context("spawn")  # no CUDA or model state leaks into the workers
        self._pool = None

    def __enter__(self) -> EquivalenceJudge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _ensure_pool(self):
        if self._pool is None:
            # Wait until a worker has imported math_verify (seconds; more on a busy machine),
            # so that the per-pair limit measures judging, not start-up.
            self._pool = self._ctx.Pool(self.workers, initializer=_import_math_verify)
            self._pool.apply_async(_import_math_verify).get(timeout=self.startup_timeout_s)
        return self._pool

    def judge_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[Judgement]:
        """One `Judgement` per (gold, prediction) pair, in order."""
        results: list[Judgement | None] = [None] * len(pairs)
        todo = []
        for i, (_gold, pred) in enumerate(pairs):
            if pred is None:
                results[i] = Judgement(False, JUDGE_NO_ANSWER)
            else:
                todo.append(i)
        while todo:
            pool = self._ensure_pool()
            pending = [
                (i, pool.apply_async(self.judge_fn, (*pairs[i], self.timeout_seconds)))
                for i in todo
            ]
            todo = []
            for n, (i, handle) in enumerate(pending):
                try:
                    results[i] = handle.get(timeout=self.hard_timeout_s)
                except mp.TimeoutError:
                    gold, pred = pairs[i]
                    results[i] = Judgement(
                        normalized_equal(gold, pred),
                        JUDGE_FALLBACK,
                        f"math_verify worker killed after {self.hard_timeout_s:.0f} s",
                    )
                    self.num_killed += 1
                    logger.warning(
                        "math_verify did not finish within %.0f s on prediction %r (gold %r): "
                        "killed it, judged by the fallback",
                        self.hard_timeout_s,
                        pred[:80],
                        gold[:80],
                    )
                    self.close()
                    todo = [j for j, _ in pending[n + 1 :]]  # resubmit to a fresh pool
                    break
        return results  # type: ignore[return-value]
