"""Benchmarks as JSON Lines: one problem per line with a problem text and a gold answer.

Key names (the Qwen2.5-Math evaluation data, `evaluation/data/<name>/test.jsonl`, read
from its `parser.py`):

| benchmark      | problem key | gold answer                                        |
|----------------|-------------|----------------------------------------------------|
| math500        | problem     | answer                                             |
| minerva_math   | problem     | last \\boxed{} of `solution` (there is no answer key) |
| olympiadbench  | question    | final_answer[0] with its `$` stripped              |
| aime24         | problem     | answer                                             |
| amc23          | question    | answer (a number, e.g. 27.0)                       |

Without explicit keys, the problem is the first of `problem`, `question`, `Question`,
`input`, and the gold answer the first of `answer`, `final_answer`, `gt`, then the last box
of `solution`. A list-valued answer gives its first element (a warning counts lists with
more than one); numbers become strings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dft_megatron.eval.answers import extract_boxed_answer

logger = logging.getLogger(__name__)

PROBLEM_KEYS = ("problem", "question", "Question", "input")
ANSWER_KEYS = ("answer", "final_answer", "gt")


@dataclass(frozen=True)
class Problem:
    index: int
    """0-based position in the file (the cache's key)."""
    problem: str
    answer: str


def _answer_text(value, where: str, multi: list[str]) -> str:
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: the gold answer is an empty list")
        if len(value) > 1:
            multi.append(where)
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: the gold answer {value!r} is not a string or a number")
    text = str(value).strip()
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


def load_benchmark(
    path: str | Path,
    problem_key: str | None = None,
    answer_key: str | None = None,
) -> list[Problem]:
    """Read a JSON Lines benchmark; the keys default to the search orders above."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    problems: list[Problem] = []
    multi: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            pkeys = (problem_key,) if problem_key else PROBLEM_KEYS
            pk = next((k for k in pkeys if k in row), None)
            if pk is None:
                raise ValueError(
                    f"{where}: no problem key among {list(pkeys)} (keys: {sorted(row)}); "
                    "pass --problem-key"
                )
            akeys = (answer_key,) if answer_key else ANSWER_KEYS
            ak = next((k for k in akeys if k in row), None)
            if ak is not None:
                answer = _answer_text(row[ak], where, multi)
            elif not answer_key and isinstance(row.get("solution"), str):
                answer = extract_boxed_answer(row["solution"])  # minerva_math
                if answer is None:
                    raise ValueError(f"{where}: no answer key and no \\boxed{{}} in `solution`")
            else:
                raise ValueError(
                    f"{where}: no answer key among {list(akeys)} (keys: {sorted(row)}); "
                    "pass --answer-key"
                )
            if not answer:
                raise ValueError(f"{where}: the gold answer is empty")
            problems.append(Problem(len(problems), str(row[pk]), answer))
    if not problems:
        raise ValueError(f"benchmark file {path} holds no problems")
    if multi:
        logger.warning(
            "%s: %d problems have more than one gold answer; only the first is used (e.g. %s)",
            path,
            len(multi),
            multi[0],
        )
    return problems


def resolve_benchmarks(spec: str) -> dict[str, Path]:
    """`NAME=PATH[,NAME=PATH...]`, or a directory of `<name>.jsonl` or `<name>/test.jsonl`."""
    candidate = Path(spec)
    if "=" not in spec and candidate.is_dir():
        found = {p.stem: p for p in sorted(candidate.glob("*.jsonl"))}
        for sub in sorted(p for p in candidate.iterdir() if p.is_dir()):
            if (sub / "test.jsonl").is_file():
                found.setdefault(sub.name, sub / "test.jsonl")  # the Qwen2.5-Math layout
        if not found:
            raise ValueError(
                f"--benchmarks {spec}: the directory holds no <name>.jsonl or <name>/test.jsonl"
            )
        return found
    out: dict[str, Path] = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(
                f"--benchmarks: {item!r} is not NAME=PATH.jsonl (or give a directory of "
                "<name>.jsonl files)"
            )
        if name.strip() in out:
            raise ValueError(f"--benchmarks: {name.strip()!r} is given twice")
        out[name.strip()] = Path(path.strip())
    return out
