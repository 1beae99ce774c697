#!/usr/bin/env bash
# GPT training with the DFT loss on Megatron-Core: one torchrun per node (Megatron-LM style).
#
#   bash examples/pretrain_gpt_dft.sh [extra or overriding trainer flags...]
#
# Flags after the script name go last to `python -m dft_megatron.train`, so they override
# the ones below (argparse keeps the last value): e.g. `--loss-type sft`, `--train-iters 50`.
# See `python -m dft_megatron.train --help` for every flag.
#
# No GPU visible: a tiny model on 2 CPU processes over gloo (TP 2, local layers, a few
# iterations; well under a minute). A GPU: a ~125M-parameter GPT (GPT-3 "small": 12 layers,
# hidden 768, 12 heads, seq 2048, GPT-2 vocabulary) in bf16, Transformer Engine layers when
# installed.
#
# Environment (defaults in brackets):
#   GPUS_PER_NODE [all visible GPUs; CPU: 2]  processes on this node
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [6000]
#   TP [GPU: 1, CPU: 2]  PP [1]                tensor / pipeline model-parallel sizes
#   MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, LR   (see the *_ARGS below)
#   LOSS_TYPE [dft]                          dft or sft
#   FP8 [unset]  FP8_RECIPE [delayed]        e.g. FP8=hybrid: FP8 GEMMs through TE (GPU only)
#   SAVE, LOAD, TENSORBOARD_DIR [unset]      checkpoint directories, TensorBoard log directory
#   PYTHON [.venv/bin/python if present, else python]
#
# Data: DATA_PATH (Megatron indexed data from tools/preprocess_data.py, a prefix or a weighted
#   blend "0.7 PREFIX_A 0.3 PREFIX_B") with TOKENIZER (its Hugging Face tokenizer folder), or
#   SFT_DATA (JSON Lines etc., see README.md) with TOKENIZER; otherwise synthetic tokens
#   (--mock-data). More data flags (--prompt-key, --split, ...) pass through as extra flags.
# Multi-node: run this script once per node with the same MASTER_ADDR/MASTER_PORT and
# NNODES, NODE_RANK = 0..NNODES-1 (examples/pretrain_gpt_dft.sbatch does that under SLURM).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        PYTHON="$REPO_ROOT/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
# The package from this checkout, installed or not; the working directory stays the caller's,
# so relative SAVE/LOAD paths mean what they say.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c 'import torch, megatron.core' 2>/dev/null; then
    echo "error: $PYTHON cannot import torch and megatron.core; run scripts/setup.sh, or set" \
        "PYTHON=/path/to/python with dft-megatron's dependencies" >&2
    exit 1
fi
ON_GPU=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
PP=${PP:-1}
LOSS_TYPE=${LOSS_TYPE:-dft}

if [[ "$ON_GPU" == 1 ]]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
    TP=${TP:-1}
    # One hardware queue per GPU: kernels start in launch order, which Megatron-Core's overlap
    # of TP/SP communication and data-parallel reduction with compute relies on.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    echo "GPU run: ~125M-parameter GPT, bf16, $NNODES node(s) x $GPUS_PER_NODE GPU(s), TP $TP, PP $PP"

    MODEL_ARGS=(
        --num-layers 12
        --hidden-size 768
        --num-attention-heads 12
        --seq-length 2048
        --max-position-embeddings 2048
        --position-embedding-type learned_absolute
        --normalization LayerNorm
        --hidden-dropout 0.0
        --attention-dropout 0.0
        --init-method-std 0.02
        --bf16
        --transformer-impl "${TRANSFORMER_IMPL:-auto}" # TE when installed (NGC container)
    )
    if [[ -n "${FP8:-}" ]]; then
        MODEL_ARGS+=(--fp8-format "$FP8" --fp8-recipe "${FP8_RECIPE:-delayed}")
    fi
    TRAINING_ARGS=(
        --micro-batch-size "${MICRO_BATCH_SIZE:-4}"
        --global-batch-size "${GLOBAL_BATCH_SIZE:-256}" # 256 x 2048 = 0.5M tokens per step
        --train-iters "${TRAIN_ITERS:-2000}"
        --lr "${LR:-6e-4}"
        --min-lr 6e-5
        --lr-decay-style cosine
        --lr-warmup-fraction 0.01
        --weight-decay 0.1
        --adam-beta1 0.9
        --adam-beta2 0.95
        --clip-grad 1.0
        --loss-type "$LOSS_TYPE"
    )
    PARALLEL_ARGS=(
        --tensor-model-parallel-size "$TP"
        --pipeline-model-parallel-size "$PP"
        --use-distributed-optimizer
        --overlap-grad-reduce
    )
    if ((TP > 1)); then
        PARALLEL_ARGS+=(--sequence-parallel)
    fi
    LOGGING_ARGS=(--log-interval 10 --eval-interval 500 --eval-iters 4 --save-interval 1000)
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-2}
    TP=${TP:-2}
    echo "no GPU visible: tiny CPU run over gloo ($GPUS_PER_NODE processes, TP $TP, local layers," \
        "mock data); on a GPU machine this script trains a ~125M-parameter GPT in bf16"

    MODEL_ARGS=(
        --num-layers 4
        --hidden-size 64
        --num-attention-heads 4
        --seq-length 32
        --transformer-impl local # Transformer Engine layers need a GPU
    )
    TRAINING_ARGS=(
        --micro-batch-size "${MICRO_BATCH_SIZE:-1}"
        --global-batch-size "${GLOBAL_BATCH_SIZE:-4}"
        --train-iters "${TRAIN_ITERS:-4}"
        --lr "${LR:-1e-3}"
        --lr-decay-style cosine
        --adam-beta2 0.95
        --loss-type "$LOSS_TYPE"
    )
    PARALLEL_ARGS=(
        --tensor-model-parallel-size "$TP"
        --pipeline-model-parallel-size "$PP"
    )
    LOGGING_ARGS=(--log-interval 1 --eval-interval 2 --eval-iters 1)
fi

# The vocabulary: the tokenizer's when there is one, else GPT-2's size (GPU) or a tiny one.
if [[ -z "${TOKENIZER:-}" ]]; then
    MODEL_ARGS+=(--vocab-size "$([[ "$ON_GPU" == 1 ]] && echo 50257 || echo 200)")
fi
if [[ -n "${DATA_PATH:-}" ]]; then
    # shellcheck disable=SC2206  # the blend is words: weights and prefixes
    DATA_ARGS=(--data-path $DATA_PATH --tokenizer-model "${TOKENIZER:?DATA_PATH needs TOKENIZER}")
elif [[ -n "${SFT_DATA:-}" ]]; then
    DATA_ARGS=(--sft-data "$SFT_DATA" --tokenizer-model "${TOKENIZER:?SFT_DATA needs TOKENIZER}"
        --valid-fraction 0.02)
else
    DATA_ARGS=(--mock-data)
fi

if [[ -n "${SAVE:-}" ]]; then
    LOGGING_ARGS+=(--save "$SAVE")
fi
if [[ -n "${LOAD:-}" ]]; then
    LOGGING_ARGS+=(--load "$LOAD")
fi
if [[ -n "${TENSORBOARD_DIR:-}" ]]; then
    LOGGING_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
fi

# torchrun, from the same Python as the checks above.
exec "$PYTHON" -m torch.distributed.run \
    --nproc-per-node "$GPUS_PER_NODE" \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" \
    -m dft_megatron.train \
    "${MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${LOGGING_ARGS[@]}" \
    "$@"
