#!/usr/bin/env bash
# GPT training with the DFT loss on Megatron-LM's trainer, launched the way Megatron-LM's
# examples/gpt3/train_gpt3_175b_distributed.sh is: one torchrun per node, the flags in bash
# arrays by group, `pretrain_gpt.py` replaced by `-m dft_megatron.train`. Every flag is
# Megatron-LM's, with its meaning and default, except the DFT ones (--loss-type and the SFT
# data flags; `python -m dft_megatron.train --help` lists them).
#
#   bash examples/pretrain_gpt_dft.sh [extra or overriding flags...]
#
# Flags after the script name go last, so they override the ones below (argparse keeps the
# last value): e.g. `--loss-type sft`, `--train-iters 50`, `--log-metrics-jsonl m.jsonl`.
#
# No GPU visible: a tiny model on 2 CPU processes over gloo (TP 2, local layers, mock data,
# 4 iterations with a validation and, with SAVE, a checkpoint). A GPU: a ~125M-parameter GPT
# (GPT-3 "small": 12 layers, hidden 768, 12 heads, seq 2048, GPT-2's vocabulary size) in bf16
# with the distributed optimizer; Megatron-LM's default layers (Transformer Engine) where TE
# is importable, the local ones otherwise.
#
# Environment (defaults in brackets):
#   GPUS_PER_NODE [all visible GPUs; CPU: 2]  processes on this node
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [6000]
#   TP [GPU: 1, CPU: 2]  PP [1]                tensor / pipeline model-parallel sizes
#   MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, LR   (see TRAINING_ARGS below)
#   LOSS_TYPE [dft]                           dft or sft. From random weights DFT barely learns
#                                             (every target's p is about 1/vocabulary, and so is
#                                             its weight): sft to pre-train from scratch, dft to
#                                             fine-tune a LOAD checkpoint (add --finetune)
#   FP8 [unset]  FP8_RECIPE [delayed]         e.g. FP8=hybrid: FP8 GEMMs through TE (GPU only)
#   SAVE, LOAD [unset]  SAVE_INTERVAL [GPU: 1000, CPU: 2]  TENSORBOARD_DIR [unset]
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

if ! "$PYTHON" -c 'import torch, megatron.training' 2>/dev/null; then
    echo "error: $PYTHON cannot import torch and megatron.training; run scripts/setup.sh, or" \
        "set PYTHON=/path/to/python with dft-megatron's dependencies" >&2
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

    GPT_MODEL_ARGS=(
        --num-layers 12
        --hidden-size 768
        --num-attention-heads 12
        --seq-length 2048
        --max-position-embeddings 2048
        --attention-backend auto # Megatron-LM's choice among TE's flash/fused/unfused and local
        --hidden-dropout 0.0
        --attention-dropout 0.0
    )
    TRAINING_ARGS=(
        --micro-batch-size "${MICRO_BATCH_SIZE:-4}"
        --global-batch-size "${GLOBAL_BATCH_SIZE:-256}" # 256 x 2048 = 0.5M tokens per step
        --train-iters "${TRAIN_ITERS:-2000}"
        --weight-decay 0.1
        --adam-beta1 0.9
        --adam-beta2 0.95
        --init-method-std 0.02
        --clip-grad 1.0
        --bf16
        --lr "${LR:-6e-4}"
        --lr-decay-style cosine
        --min-lr 6e-5
        --lr-warmup-fraction 0.01
    )
    if [[ -n "${FP8:-}" ]]; then
        TRAINING_ARGS+=(--fp8-format "$FP8" --fp8-recipe "${FP8_RECIPE:-delayed}")
    fi
    MODEL_PARALLEL_ARGS=(
        --tensor-model-parallel-size "$TP"
        --pipeline-model-parallel-size "$PP"
        --use-distributed-optimizer
        --overlap-grad-reduce
        --overlap-param-gather
    )
    if ((TP > 1)); then
        MODEL_PARALLEL_ARGS+=(--sequence-parallel)
    fi
    EVAL_AND_LOGGING_ARGS=(
        --log-interval 10
        --log-throughput
        --eval-interval 500
        --eval-iters 4
        --save-interval "${SAVE_INTERVAL:-1000}"
    )
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-2}
    TP=${TP:-2}
    echo "no GPU visible: tiny CPU run over gloo ($GPUS_PER_NODE processes, TP $TP, PP $PP," \
        "local layers, mock data); on a GPU machine this script trains a ~125M-parameter GPT"

    # On CPU dft_megatron's defaults are gloo, --transformer-impl local, no fusions and no
    # data-loader workers; GPU-only flags (FP8, TE, nccl, overlap, ...) are refused by name.
    GPT_MODEL_ARGS=(
        --num-layers 4
        --hidden-size 64
        --num-attention-heads 4
        --seq-length 32
        --max-position-embeddings 32
    )
    TRAINING_ARGS=(
        --micro-batch-size "${MICRO_BATCH_SIZE:-1}"
        --global-batch-size "${GLOBAL_BATCH_SIZE:-4}"
        --train-iters "${TRAIN_ITERS:-4}"
        --weight-decay 0.1
        --adam-beta1 0.9
        --adam-beta2 0.95
        --clip-grad 1.0
        --lr "${LR:-1e-3}"
        --lr-decay-style cosine
        --min-lr 1e-4
        --lr-warmup-iters 1
    )
    MODEL_PARALLEL_ARGS=(
        --tensor-model-parallel-size "$TP"
        --pipeline-model-parallel-size "$PP"
    )
    EVAL_AND_LOGGING_ARGS=(
        --log-interval 1
        --eval-interval 2
        --eval-iters 1
        --save-interval "${SAVE_INTERVAL:-2}"
    )
fi

DFT_ARGS=(--loss-type "$LOSS_TYPE") # dft (Wu et al., 2025) or sft (Megatron-LM's plain CE)

# Megatron-LM's data flags, or dft_megatron's SFT data flags. The vocabulary is the
# tokenizer's when there is one; mock data uses Megatron-LM's NullTokenizer with GPT-2's
# vocabulary size on GPU, a tiny one on CPU.
if [[ -n "${DATA_PATH:-}" ]]; then
    # shellcheck disable=SC2206  # the blend is words: weights and prefixes
    DATA_ARGS=(--data-path $DATA_PATH --split 969,30,1
        --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model "${TOKENIZER:?DATA_PATH needs TOKENIZER}")
elif [[ -n "${SFT_DATA:-}" ]]; then
    DATA_ARGS=(--sft-data "$SFT_DATA" --valid-fraction 0.02
        --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model "${TOKENIZER:?SFT_DATA needs TOKENIZER}")
else
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer
        --vocab-size "$([[ "$ON_GPU" == 1 ]] && echo 50257 || echo 200)")
fi

if [[ -n "${SAVE:-}" ]]; then
    EVAL_AND_LOGGING_ARGS+=(--save "$SAVE")
fi
if [[ -n "${LOAD:-}" ]]; then
    EVAL_AND_LOGGING_ARGS+=(--load "$LOAD")
fi
if [[ -n "${TENSORBOARD_DIR:-}" ]]; then
    EVAL_AND_LOGGING_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
fi

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)

# torchrun, from the same Python as the checks above.
exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m dft_megatron.train \
    "${GPT_MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${DFT_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}" \
    "$@"
