#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with Python >= 3.12 and
# install dft-megatron with its dev, hf, eval and plots extras at the versions CI tests (.ci/constraints.txt).
#   bash scripts/setup.sh            # reuse .venv if it is there
#   bash scripts/setup.sh --clean    # start from an empty .venv
# Python: $PYTHON if set, else python3.12 (through pyenv when it has a 3.12), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
if [[ "${1:-}" == "--clean" ]]; then
    rm -rf "$venv"
fi

find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
        return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local v
        v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -V | tail -n 1 || true)
        if [[ -n "$v" ]]; then
            echo "$(pyenv root)/versions/$v/bin/python3.12"
            return
        fi
    fi
    command -v python3.12 || command -v python3
}

if [[ ! -x "$venv/bin/python" ]]; then
    py=$(find_python)
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
        echo "error: $py is Python $("$py" -c 'import platform; print(platform.python_version())');" \
            "Megatron-Core 0.19 needs Python >= 3.12. Set PYTHON=/path/to/python3.12." >&2
        exit 1
    fi
    echo "creating $venv with $py"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

echo "installing dft-megatron[dev,hf,eval,plots] into $venv (torch and megatron-core are large: minutes on a new machine)"
"$venv/bin/python" -m pip install --quiet --progress-bar off -c .ci/constraints.txt -e '.[dev,hf,eval,plots]'
"$venv/bin/python" -c 'import torch, megatron.core, dft_megatron; print(f"ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, dft-megatron {dft_megatron.__version__}")' 2>/dev/null
