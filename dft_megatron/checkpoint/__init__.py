"""Megatron-LM checkpoints, shared by training and conversion.

Training writes and reads them through Megatron-LM's own `save_checkpoint` / `load_checkpoint`
(the trainer's); conversion does the same in a one-process Megatron-LM session
(`megatron_session`), so both produce and consume exactly Megatron-LM's format:

    SAVE/latest_checkpointed_iteration.txt     "release" (a converted model) or an iteration
    SAVE/release/ or SAVE/iter_0000042/        torch_dist files; common.pt holds the args
    SAVE/tokenizer/                            the Hugging Face tokenizer (dft_megatron's
                                               addition: --load finds it, the export copies it)

A converted model is a "release" checkpoint, as Megatron-LM's own converters write them:
`--load SAVE` starts from its weights at iteration 0 with a fresh optimizer, with or without
`--finetune`. Its args describe the architecture, so `--load SAVE` needs no model flags
(`--use-checkpoint-args`, implied when none is given).
"""

from dft_megatron.checkpoint.args import model_config_from_args, model_flags
from dft_megatron.checkpoint.paths import (
    TOKENIZER_DIR,
    TRACKER,
    checkpoint_dir,
    checkpoint_root,
    has_checkpoint,
    read_tracker,
    stored_tokenizer,
)
from dft_megatron.checkpoint.session import load_weights, megatron_session, save_release

__all__ = [
    "TOKENIZER_DIR",
    "TRACKER",
    "checkpoint_dir",
    "checkpoint_root",
    "has_checkpoint",
    "load_weights",
    "megatron_session",
    "model_config_from_args",
    "model_flags",
    "read_tracker",
    "save_release",
    "stored_tokenizer",
]
