#!/usr/bin/env bash
# The test command: sets up .venv if it is missing, then lint and the test suite on CPU.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash scripts/setup.sh
.venv/bin/ruff check dft_megatron tests benchmarks tools examples scripts
.venv/bin/ruff format --check dft_megatron tests benchmarks tools examples scripts
.venv/bin/python -m pytest "$@"
