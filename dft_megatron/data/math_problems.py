"""Generated step-by-step math problems for the quickstart, in the prompt/response format.

Each row is `{"problem", "solution", "answer", "kind", "difficulty"}`: the solution is a
short chain of steps (every step an equation `$lhs = rhs$` that holds exactly) ending with
`The answer is \\boxed{ANSWER}.`, like NuminaMath-CoT's solutions. Four kinds:

- arithmetic: integer expressions with +, -, x and parentheses, evaluated in the order of
  operations one operation per step;
- fractions: sums, differences and products of fractions over a least common denominator,
  reduced to lowest terms (answers `\\frac{a}{b}`, `-\\frac{a}{b}` or an integer);
- linear: `ax + b = c` (and `ax + b = cx + d` when hard) solved by moving terms;
- word: rates (distance, work), shopping (totals, change, discounts) and ages.

Every value is computed with `fractions.Fraction`, so answers are exact. `difficulty` picks
the number ranges and the number of steps: the training split mixes "easy" and "medium",
the held-out split is "hard" (bigger numbers, more steps) and shares no problem text with
the training split. Everything is deterministic in the seed.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

KINDS = ("arithmetic", "fractions", "linear", "word")
DIFFICULTIES = ("easy", "medium", "hard")
TRAIN_DIFFICULTIES = ("easy", "medium")
TEST_DIFFICULTIES = ("hard",)

ANSWER_SUFFIX = "The answer is \\boxed{{{}}}."


def format_number(value: Fraction | int) -> str:
    """An exact value in LaTeX: `12`, `-3`, `\\frac{5}{6}`, `-\\frac{7}{4}`."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


@dataclass(frozen=True)
class Problem:
    """One generated problem; `answer` is exact."""

    kind: str
    difficulty: str
    problem: str
    steps: list[str]
    answer: Fraction

    def to_row(self) -> dict[str, str]:
        answer = format_number(self.answer)
        solution = "\n".join([*self.steps, ANSWER_SUFFIX.format(answer)])
        return {
            "problem": self.problem,
            "solution": solution,
            "answer": answer,
            "kind": self.kind,
            "difficulty": self.difficulty,
        }


# ---------------------------------------------------------------------------- arithmetic

_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "\\times": lambda a, b: a * b,
}


def _render(items: list) -> str:
    parts = []
    for item in items:
        if isinstance(item, tuple):  # a parenthesized (a op b)
            parts.append(f"({item[0]} {item[1]} {item[2]})")
        else:
            parts.append(str(item))
    return " ".join(parts)


def _arithmetic(rng: random.Random, difficulty: str) -> Problem:
    n_ops, hi, n_parens = {
        "easy": (2, 12, 0),
        "medium": (3, 20, rng.randint(0, 1)),
        "hard": (rng.randint(4, 5), 50, rng.randint(1, 2)),
    }[difficulty]
    lo = 2 if difficulty == "hard" else 1
    items: list = [rng.randint(lo, hi)]
    for _ in range(n_ops):
        items += [rng.choice(("+", "-", "\\times")), rng.randint(lo, hi)]
    operand_slots = list(range(0, len(items), 2))
    for slot in rng.sample(operand_slots, n_parens):
        a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)), reverse=True)
        items[slot] = (a, rng.choice(("+", "-")), b)  # a >= b: no negative inside a product

    problem = f"Evaluate ${_render(items)}$."
    steps = [
        "We use the order of operations: parentheses first, then multiplication, "
        "then addition and subtraction from left to right."
    ]

    def step(label: str, a, op: str, b, result: Fraction, rest: list) -> None:
        text = f"{label}: ${a} {op} {b} = {format_number(result)}$"
        if len(rest) > 1:
            text += f", so the expression becomes ${_render(rest)}$"
        steps.append(text + ".")

    for i, item in enumerate(items):
        if isinstance(item, tuple):
            value = _OPS[item[1]](Fraction(item[0]), Fraction(item[2]))
            items[i] = int(value)
            step("Parentheses", item[0], item[1], item[2], value, items)
    while "\\times" in items:
        i = items.index("\\times")
        value = Fraction(items[i - 1]) * items[i + 1]
        a, b = items[i - 1], items[i + 1]
        items[i - 1 : i + 2] = [int(value)]
        step("Multiplication", a, "\\times", b, value, items)
    while len(items) > 1:
        a, op, b = items[:3]
        value = _OPS[op](Fraction(a), Fraction(b))
        items[:3] = [int(value)]
        step("Left to right", a, op, b, value, items)
    return Problem("arithmetic", difficulty, problem, steps, Fraction(items[0]))


# ----------------------------------------------------------------------------- fractions


def _frac(num: int, den: int) -> str:
    """num/den as written, not reduced: `\\frac{6}{8}`, `-\\frac{3}{4}`."""
    sign = "-" if num < 0 else ""
    return f"{sign}\\frac{{{abs(num)}}}{{{den}}}"


def _fraction_steps(a: Fraction, op: str, b: Fraction) -> tuple[list[str], Fraction]:
    """Steps of one fraction operation, ending in lowest terms."""
    fa, fb = format_number(a), format_number(b)
    steps = []
    if op == "\\times":
        num, den = a.numerator * b.numerator, a.denominator * b.denominator
        steps.append(
            f"Multiply the numerators and the denominators: ${fa} \\times {fb} = "
            f"\\frac{{{a.numerator} \\times {b.numerator}}}{{{a.denominator} \\times "
            f"{b.denominator}}} = {_frac(num, den)}$."
        )
    else:
        den = math.lcm(a.denominator, b.denominator)
        na, nb = a.numerator * (den // a.denominator), b.numerator * (den // b.denominator)
        steps.append(
            f"The least common denominator of {a.denominator} and {b.denominator} is {den}."
        )
        for value, num in ((a, na), (b, nb)):
            if value.denominator != den:
                steps.append(
                    f"Rewrite ${format_number(value)} = \\frac{{{num}}}{{{den}}}$"
                    f" (multiply top and bottom by {den // value.denominator})."
                )
        num = na + nb if op == "+" else na - nb
        verb = "Add" if op == "+" else "Subtract"
        nb_text = f"({nb})" if nb < 0 else str(nb)
        steps.append(
            f"{verb} the numerators: ${_frac(na, den)} {op} {_frac(nb, den)} = "
            f"\\frac{{{na} {op} {nb_text}}}{{{den}}} = {_frac(num, den)}$."
        )
    result = Fraction(num, den)
    g = math.gcd(num, den)
    if den == 1:
        pass
    elif g > 1:
        steps.append(
            f"Divide the numerator and the denominator by their greatest common divisor {g}: "
            f"${_frac(num, den)} = {format_number(result)}$."
        )
    else:
        steps.append(f"The fraction ${format_number(result)}$ is already in lowest terms.")
    return steps, result


def _fractions(rng: random.Random, difficulty: str) -> Problem:
    n_terms, max_den, improper = {
        "easy": (2, 6, False),
        "medium": (2, 12, True),
        "hard": (3, 20, True),
    }[difficulty]

    def draw() -> Fraction:
        den = rng.randint(2, max_den)
        num = rng.randint(1, 2 * den if improper else den - 1)
        if Fraction(num, den).denominator == 1:
            num += 1
        return Fraction(num, den)

    terms = [draw() for _ in range(n_terms)]
    if n_terms == 2:
        ops = [rng.choice(("+", "-", "\\times"))]
    else:  # a chain of one precedence level, so left to right is the order of operations
        ops = [rng.choice(("+", "-")) for _ in range(n_terms - 1)]
        if rng.random() < 0.3:
            ops = ["\\times"] * (n_terms - 1)
    expression = format_number(terms[0])
    for op, term in zip(ops, terms[1:], strict=True):
        expression += f" {op} {format_number(term)}"
    problem = f"Compute ${expression}$ and write the result as a fraction in lowest terms."
    steps = []
    value = terms[0]
    for i, (op, term) in enumerate(zip(ops, terms[1:], strict=True)):
        if n_terms > 2:
            steps.append(
                f"Step {i + 1}: work out ${format_number(value)} {op} {format_number(term)}$."
            )
        new_steps, value = _fraction_steps(value, op, term)
        steps += new_steps
    return Problem("fractions", difficulty, problem, steps, value)


# -------------------------------------------------------------------------------- linear


def _linear_side(a: int, b: int) -> str:
    """`ax + b` with the usual signs: `3x - 5`, `-x + 2`, `4x`, `7`."""
    if a == 0:
        return str(b)
    text = {1: "x", -1: "-x"}.get(a, f"{a}x")
    if b > 0:
        text += f" + {b}"
    elif b < 0:
        text += f" - {-b}"
    return text


def _linear(rng: random.Random, difficulty: str) -> Problem:
    def nonzero(lo: int, hi: int) -> int:
        return rng.choice([v for v in range(lo, hi + 1) if v != 0])

    if difficulty == "hard":
        a, c = nonzero(-15, 15), nonzero(-15, 15)
        while c == a:
            c = nonzero(-15, 15)
        b, d = nonzero(-60, 60), nonzero(-60, 60)
    else:
        a = rng.randint(2, 9) if difficulty == "easy" else nonzero(-12, 12)
        while difficulty == "medium" and a in (1, -1):
            a = nonzero(-12, 12)
        x = rng.randint(1, 12) if difficulty == "easy" else rng.randint(-15, 15)
        b = rng.randint(1, 20) if difficulty == "easy" else nonzero(-30, 30)
        c, d = 0, a * x + b
    problem = f"Solve for $x$: ${_linear_side(a, b)} = {_linear_side(c, d)}$."
    steps = []
    if c != 0:
        if c > 0:
            move = f"Subtract ${_linear_side(c, 0)}$ from"
        else:
            move = f"Add ${_linear_side(-c, 0)}$ to"
        a -= c
        steps.append(f"{move} both sides to collect the $x$ terms: ${_linear_side(a, b)} = {d}$.")
    if b > 0:
        steps.append(f"Subtract {b} from both sides: ${_linear_side(a, 0)} = {d} - {b} = {d - b}$.")
    else:
        steps.append(f"Add {-b} to both sides: ${_linear_side(a, 0)} = {d} + {-b} = {d - b}$.")
    x_value = Fraction(d - b, a)
    if a == 1:
        steps.append(f"So $x = {format_number(x_value)}$.")
    else:
        steps.append(
            f"Divide both sides by {a}: $x = \\frac{{{d - b}}}{{{a}}} = {format_number(x_value)}$."
        )
    return Problem("linear", difficulty, problem, steps, x_value)


# ---------------------------------------------------------------------------------- word

_NAMES = (
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Hugo", "Ines", "Jonas", "Kai",
    "Lena", "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Yuki",
)  # fmt: skip
_VEHICLES = ("car", "bus", "train", "cyclist", "truck", "boat")
_ITEMS = (
    ("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("book", "books"),
    ("ticket", "tickets"), ("sandwich", "sandwiches"), ("cup", "cups"), ("ball", "balls"),
)  # fmt: skip
_PRODUCTS = ("bottles", "boxes", "bolts", "cans", "bricks", "jars")


def _distance(rng: random.Random, difficulty: str) -> Problem:
    n_legs, max_speed, max_hours = {"easy": (1, 60, 5), "medium": (2, 90, 6), "hard": (3, 120, 9)}[
        difficulty
    ]
    vehicle = rng.choice(_VEHICLES)
    legs = [(rng.randint(2, max_speed // 5) * 5, rng.randint(1, max_hours)) for _ in range(n_legs)]
    parts = [f"{v} km/h for {t} hours" for v, t in legs]
    trip = parts[0] if n_legs == 1 else ", then at ".join(parts)
    problem = f"A {vehicle} travels at {trip}. How many kilometers does it travel in total?"
    steps = ["Distance is speed times time."]
    distances = []
    for i, (v, t) in enumerate(legs):
        distances.append(v * t)
        label = "" if n_legs == 1 else f"Part {i + 1}: "
        steps.append(f"{label}${v} \\times {t} = {v * t}$ km.")
    total = sum(distances)
    if n_legs > 1:
        steps.append(f"Total: ${' + '.join(map(str, distances))} = {total}$ km.")
    return Problem("word", difficulty, problem, steps, Fraction(total))


def _work(rng: random.Random, difficulty: str) -> Problem:
    product = rng.choice(_PRODUCTS)
    rate = rng.randint(2, {"easy": 12, "medium": 30, "hard": 75}[difficulty])
    if difficulty == "easy":
        minutes = rng.randint(2, 15)
        problem = f"A machine fills {rate} {product} per minute. How many {product} does it fill in {minutes} minutes?"  # noqa: E501
        steps = [f"In {minutes} minutes it fills ${rate} \\times {minutes} = {rate * minutes}$."]
        return Problem("word", difficulty, problem, steps, Fraction(rate * minutes))
    hours = rng.randint(2, 8 if difficulty == "medium" else 24)
    machines = 1 if difficulty == "medium" else rng.randint(2, 9)
    who = "A machine fills" if machines == 1 else f"Each of {machines} machines fills"
    problem = (
        f"{who} {rate} {product} per minute. How many {product} "
        f"{'does it' if machines == 1 else 'do they'} fill in {hours} hours?"
    )
    steps = [f"{hours} hours is ${hours} \\times 60 = {hours * 60}$ minutes."]
    per_machine = rate * hours * 60
    steps.append(
        f"One machine fills ${rate} \\times {hours * 60} = {per_machine}$ {product} in that time."
    )
    total = per_machine
    if machines > 1:
        total = per_machine * machines
        steps.append(f"{machines} machines fill ${per_machine} \\times {machines} = {total}$.")
    return Problem("word", difficulty, problem, steps, Fraction(total))


def _shopping(rng: random.Random, difficulty: str) -> Problem:
    name = rng.choice(_NAMES)
    n_items, max_count, max_price = {"easy": (1, 9, 9), "medium": (2, 12, 20), "hard": (3, 25, 60)}[
        difficulty
    ]
    items = rng.sample(_ITEMS, n_items)
    bought = [(rng.randint(2, max_count), rng.randint(1, max_price), item) for item in items]
    while difficulty == "hard" and sum(n * p for n, p, _ in bought) % 20:
        # A total that is a multiple of 20 makes every offered discount a whole number.
        # Redrawing the last item's count and price reaches every residue (count 1 is out,
        # but a count coprime to 20 with a free price covers all residues mod 20).
        bought[-1] = (rng.randint(2, max_count), rng.randint(1, max_price), bought[-1][2])
    phrases = [f"{n} {plural} at {p} dollars each" for n, p, (_, plural) in bought]
    listing = phrases[0] if n_items == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    costs = [n * p for n, p, _ in bought]
    total = sum(costs)
    steps = [
        f"{plural.capitalize()}: ${n} \\times {p} = {n * p}$ dollars."
        for n, p, (_, plural) in bought
    ]  # noqa: E501
    if n_items > 1:
        steps.append(f"Total: ${' + '.join(map(str, costs))} = {total}$ dollars.")
    if difficulty == "easy":
        problem = f"{name} buys {listing}. How many dollars does {name} spend?"
        return Problem("word", difficulty, problem, steps, Fraction(total))
    if difficulty == "medium":
        bill = next(b for b in (20, 50, 100, 200, 500) if b >= total)
        problem = f"{name} buys {listing} and pays with a {bill}-dollar bill. How much change, in dollars, does {name} get?"  # noqa: E501
        steps.append(f"Change: ${bill} - {total} = {bill - total}$ dollars.")
        return Problem("word", difficulty, problem, steps, Fraction(bill - total))
    percent = rng.choice((10, 20, 25, 50))
    problem = f"{name} buys {listing}. The store gives {percent}% off the total. How many dollars does {name} pay?"  # noqa: E501
    discount = Fraction(total * percent, 100)
    steps.append(
        f"The discount is {percent}% of {total}: "
        f"$\\frac{{{percent}}}{{100}} \\times {total} = {format_number(discount)}$ dollars."
    )
    paid = total - discount
    steps.append(
        f"{name} pays ${total} - {format_number(discount)} = {format_number(paid)}$ dollars."
    )  # noqa: E501
    return Problem("word", difficulty, problem, steps, paid)


def _ages(rng: random.Random, difficulty: str) -> Problem:
    older, younger = rng.sample(_NAMES, 2)
    if difficulty == "easy":
        age, gap, later = rng.randint(3, 30), rng.randint(1, 12), rng.randint(1, 10)
        problem = (
            f"{younger} is {age} years old. {older} is {gap} years older than {younger}. "
            f"How old will {older} be in {later} years?"
        )
        steps = [
            f"{older} is ${age} + {gap} = {age + gap}$ years old now.",
            f"In {later} years: ${age + gap} + {later} = {age + gap + later}$.",
        ]
        return Problem("word", difficulty, problem, steps, Fraction(age + gap + later))
    if difficulty == "medium":
        age, times, later = rng.randint(2, 15), rng.randint(2, 5), rng.randint(1, 12)
        problem = (
            f"{older} is {times} times as old as {younger}, who is {age}. "
            f"What will the sum of their ages be in {later} years?"
        )
        steps = [
            f"{older} is ${times} \\times {age} = {times * age}$ years old now.",
            f"Their ages now add up to ${times * age} + {age} = {times * age + age}$.",
            f"In {later} years each is {later} years older: "
            f"${times * age + age} + 2 \\times {later} = {times * age + age + 2 * later}$.",
        ]
        return Problem("word", difficulty, problem, steps, Fraction(times * age + age + 2 * later))
    age, gap, later = rng.randint(5, 60), rng.randint(1, 40), rng.randint(2, 25)
    total = 2 * age + gap + 2 * later
    problem = (
        f"{older} is {gap} years older than {younger}. In {later} years, the sum of their "
        f"ages will be {total}. How old is {younger} now?"
    )
    steps = [
        f"Let {younger}'s age now be $x$; then {older} is $x + {gap}$.",
        f"In {later} years the sum is $(x + {later}) + (x + {gap} + {later}) = "
        f"{_linear_side(2, gap + 2 * later)}$.",
        f"So ${_linear_side(2, gap + 2 * later)} = {total}$, and "
        f"$2x = {total} - {gap + 2 * later} = {2 * age}$.",
        f"Divide by 2: $x = \\frac{{{2 * age}}}{{2}} = {age}$.",
    ]
    return Problem("word", difficulty, problem, steps, Fraction(age))


_WORD = (_distance, _work, _shopping, _ages)


def _word(rng: random.Random, difficulty: str) -> Problem:
    return rng.choice(_WORD)(rng, difficulty)


_GENERATORS: dict[str, Callable[[random.Random, str], Problem]] = {
    "arithmetic": _arithmetic,
    "fractions": _fractions,
    "linear": _linear,
    "word": _word,
}


# ---------------------------------------------------------------------------------- API


def generate_problem(rng: random.Random, kind: str, difficulty: str) -> Problem:
    """One problem of `kind` (see KINDS) at `difficulty` (see DIFFICULTIES)."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown problem kind {kind!r}; choose from {KINDS}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {DIFFICULTIES}")
    return _GENERATORS[kind](rng, difficulty)


def iter_unique_problems(
    seed: int,
    difficulties: tuple[str, ...],
    exclude: set[str] | frozenset[str] = frozenset(),
    max_attempts_per_row: int = 50,
    kinds: tuple[str, ...] = KINDS,
) -> Iterator[dict[str, str]]:
    """Endless distinct rows (by problem text), none in `exclude`, deterministic in `seed`.

    Kinds rotate in a fixed order and the difficulty is drawn per row, so every prefix of
    the stream is balanced over the kinds. Raises if the ranges run out of new problems.
    """
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    index = 0
    while True:
        kind = kinds[index % len(kinds)]
        for _ in range(max_attempts_per_row):
            row = generate_problem(rng, kind, rng.choice(difficulties)).to_row()
            if row["problem"] not in seen:
                break
        else:
            raise RuntimeError(
                f"no new {kind} problem in {max_attempts_per_row} attempts after {index} rows "
                f"at difficulty {difficulties}: the number ranges are exhausted; ask for fewer rows"
            )
        seen.add(row["problem"])
        index += 1
        yield row


def generate_splits(
    train_size: int,
    test_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    kinds: tuple[str, ...] = KINDS,
    train_difficulties: tuple[str, ...] = TRAIN_DIFFICULTIES,
    test_difficulties: tuple[str, ...] = TEST_DIFFICULTIES,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out test rows) of `kinds`: by default the training split at
    easy/medium difficulty and the test split at hard difficulty.

    The test split is drawn first and its problem texts are excluded from the training
    split, so the two never share a problem. `progress(n)` is called after every row.
    """
    for name in kinds:
        if name not in KINDS:
            raise ValueError(f"unknown problem kind {name!r}; choose from {KINDS}")
    for name in (*train_difficulties, *test_difficulties):
        if name not in DIFFICULTIES:
            raise ValueError(f"unknown difficulty {name!r}; choose from {DIFFICULTIES}")
    splits = []
    exclude: set[str] = set()
    for size, difficulties, offset in (
        (test_size, test_difficulties, 1),
        (train_size, train_difficulties, 0),
    ):
        rows = []
        stream = iter_unique_problems(seed * 2 + offset, difficulties, exclude=exclude, kinds=kinds)
        for _ in range(size):
            rows.append(next(stream))
            if progress is not None:
                progress(1)
        exclude = {row["problem"] for row in rows}
        splits.append(rows)
    test, train = splits
    shared = {r["problem"] for r in train} & {r["problem"] for r in test}
    if shared:  # guaranteed by `exclude`; checked because the split's worth rests on it
        raise AssertionError(f"train and test share {len(shared)} problems, e.g. {min(shared)!r}")
    return train, test


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line, UTF-8, keys in insertion order."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_math_data(
    output_dir: str | Path,
    train_size: int,
    test_size: int,
    seed: int,
    vocab_size: int | None = 1024,
    progress: Callable[[int], None] | None = None,
    kinds: tuple[str, ...] = KINDS,
    train_difficulties: tuple[str, ...] = TRAIN_DIFFICULTIES,
    test_difficulties: tuple[str, ...] = TEST_DIFFICULTIES,
) -> dict:
    """Write train.jsonl, test.jsonl and (unless `vocab_size` is None) tokenizer/ to `output_dir`.
    `kinds` and the difficulties as in `generate_splits`.

    The tokenizer is trained on the training split's problems and solutions only. Returns a
    summary: paths, rows per kind and difficulty, and (with a tokenizer) its size and the
    token counts of the chat-formatted rows.
    """
    if train_size < 1 or test_size < 0:
        raise ValueError(
            f"--train-size ({train_size}) must be >= 1, --test-size ({test_size}) >= 0"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train, test = generate_splits(
        train_size, test_size, seed, progress, kinds, train_difficulties, test_difficulties
    )
    summary: dict = {"output_dir": str(output_dir), "seed": seed}
    for name, rows in (("train", train), ("test", test)):
        write_jsonl(rows, output_dir / f"{name}.jsonl")
        counts = Counter(f"{r['kind']}/{r['difficulty']}" for r in rows)
        summary[name] = {"rows": len(rows), "by_kind": dict(sorted(counts.items()))}
    if vocab_size is not None:
        from dft_megatron.data.tokenizer import save_chat_tokenizer, train_chat_tokenizer

        texts = [f"{r['problem']}\n{r['solution']}" for r in train]
        tokenizer = train_chat_tokenizer(texts, vocab_size)
        save_chat_tokenizer(tokenizer, output_dir / "tokenizer")
        summary["tokenizer"] = {"path": str(output_dir / "tokenizer"), "vocab_size": len(tokenizer)}
        if len(tokenizer) < vocab_size:
            # BPE stops when every word of the corpus is one token: a small corpus ends early.
            summary["tokenizer"]["note"] = (
                f"BPE ran out of merges at {len(tokenizer)} < --vocab-size {vocab_size}"
            )
        for name, rows in (("train", train), ("test", test)):
            lengths = [
                len(
                    tokenizer.apply_chat_template(
                        [
                            {"role": "user", "content": r["problem"]},
                            {"role": "assistant", "content": r["solution"]},
                        ],
                        tokenize=True,
                        return_dict=False,
                    )
                )
                for r in rows
            ]
            if lengths:
                summary[name]["chat_tokens"] = {
                    "mean": round(sum(lengths) / len(lengths), 1),
                    "max": max(lengths),
                    "total": sum(lengths),
                }
    return summary
