"""Requirements and pins for installing dft-megatron into an image that ships its own stack.

Used by the Dockerfile on NVIDIA's PyTorch container, which brings torch, Transformer Engine,
apex, numpy and more, built together and pinned in /etc/pip/constraint.txt. Writes:

- REQUIREMENTS: the project's dependencies and the chosen extras from pyproject.toml, less
  torch and transformer-engine (the image's builds are the ones to use);
- CONSTRAINTS: CI's pins (.ci/constraints.txt) for the packages this environment does not
  have yet; those it has keep the image's versions.

    python scripts/image_requirements.py --extras hf,eval,plots \\
        --requirements /tmp/requirements.txt --constraints /tmp/constraints.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_OWNED = {"torch", "transformer-engine"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()).group(0))


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--extras", default="hf,eval,plots", help="comma-separated optional-dependency groups"
    )
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    p.add_argument("--ci-constraints", type=Path, default=ROOT / ".ci" / "constraints.txt")
    p.add_argument("--requirements", type=Path, required=True, help="file to write")
    p.add_argument("--constraints", type=Path, required=True, help="file to write")
    args = p.parse_args()

    project = tomllib.loads(args.pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in filter(None, args.extras.split(",")):
        if extra not in optional:
            p.error(f"--extras: {extra!r} is not an extra of {args.pyproject} ({sorted(optional)})")
        reqs += optional[extra]
    kept = [r for r in reqs if requirement_name(r) not in IMAGE_OWNED]
    args.requirements.write_text("\n".join(kept) + "\n")

    pins, skipped = [], []
    for line in args.ci_constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = requirement_name(line)
        have = installed(name)
        if name in IMAGE_OWNED or have is not None:
            skipped.append(f"{name} ({have or 'not installed'})")
        else:
            pins.append(line)
    args.constraints.write_text("\n".join(pins) + "\n")
    sys.stderr.write(
        f"requirements: {', '.join(kept)}\n"
        f"pinned from CI: {', '.join(pins) or 'none'}\n"
        f"left to the image: {', '.join(skipped) or 'none'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
