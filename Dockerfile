# dft-megatron on NVIDIA's PyTorch container (NGC), which brings CUDA, cuDNN, NCCL, PyTorch,
# Transformer Engine and apex built and tested together. This image adds dft-megatron and the
# Python packages it needs without replacing any of those: megatron-core (whose wheel ships
# Megatron-LM's trainer, megatron.training, which `python -m dft_megatron.train` runs) and
# the Hugging Face and evaluation packages. On a GPU the trainer then has Megatron-LM's
# defaults: NCCL and Transformer Engine layers (the image's TE).
#
# Base image nvcr.io/nvidia/pytorch:25.12-py3, per NVIDIA's release notes
# (docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-25-12.html): CUDA 13.1.0,
# PyTorch 2.10.0a0+b4e4ee81d3, Python 3.12, and /etc/pip/constraint.txt, which pins every
# Python package the image was built with. Its Transformer Engine and NCCL versions are listed
# there too (not checked here). The host needs an NVIDIA driver that supports CUDA 13.1.
# For another release, pass --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3.
#
#   docker build -t dft-megatron .
#   docker run --gpus all --rm -it --ipc=host dft-megatron bash examples/pretrain_gpt_dft.sh
#
# Not built here (no docker engine on the project's machines); whether megatron-core 0.19.2
# works with this release's Transformer Engine has not been checked.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/dft-megatron

# Dependencies first, so that this layer survives edits of the source. The image's own
# packages (torch, Transformer Engine, numpy, ...) keep its versions: its pip constraints
# would refuse to change them and scripts/image_requirements.py pins only what is missing,
# at the versions CI tests. The build fails if torch changed anyway.
COPY pyproject.toml ./
COPY .ci/constraints.txt .ci/constraints.txt
COPY scripts/image_requirements.py scripts/image_requirements.py
RUN TORCH_BEFORE="$(python3 -c 'import torch; print(torch.__version__)')" \
    && python3 scripts/image_requirements.py --extras hf,eval,plots \
        --requirements /tmp/requirements.txt --constraints /tmp/constraints.txt \
    && python3 -m pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && python3 -c 'import sys, torch; sys.exit(torch.__version__ != sys.argv[1] and f"torch changed from {sys.argv[1]} to {torch.__version__}")' "$TORCH_BEFORE"

# The package itself, its dependencies being in place; examples/ and tools/ run from here.
# The check parses a command line with Megatron-LM's parser and DFT's flags (no GPU needed at
# build time) and loads the converter's CLI.
COPY . .
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python3 -c 'from dft_megatron.training.arguments import parse_only; parse_only(["--mock-data", "--loss-type", "dft"])' \
    && python3 tools/convert_hf_to_megatron.py --help > /dev/null

# examples/pretrain_gpt_dft.sh runs $PYTHON (python3 is the image's interpreter).
ENV PYTHON=python3

CMD ["python3", "-m", "dft_megatron.train", "--help"]
