#!/usr/bin/env bash
# The wheels that the lent GPU machine's image lacks, downloaded here (it has no network) into
# .whl/ (git-ignored) for scripts/gpu_check.sh to install there with pip --no-index.
#   bash scripts/gpu_wheels.sh            # then carry .whl with the tree (about 3 MB)
# The image (torch 2.11 + CUDA 13, transformers, triton, safetensors, tokenizers, pyarrow,
# pandas, tensorboard, psutil, pytest ...) lacks megatron-core and Hugging Face datasets with
# two of its dependencies. Versions: .ci/constraints.txt's, i.e. the ones CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
pin() { grep -E "^$1==" .ci/constraints.txt | head -n 1 || true; }
wanted=(megatron-core datasets dill multiprocess)
specs=()
for name in "${wanted[@]}"; do
    spec=$(pin "$name")
    if [[ -z "$spec" ]]; then  # not pinned in CI's constraints: the version installed here
        version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
        [[ -n "$version" ]] || { echo "error: $name is neither pinned in .ci/constraints.txt nor installed in $PY's environment" >&2; exit 2; }
        spec="$name==$version"
    fi
    specs+=("$spec")
done
rm -rf .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
echo "wheels for the GPU machine in .whl/ ($(du -sh .whl | cut -f1)): ${specs[*]}"
