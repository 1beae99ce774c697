"""`torchrun ... -m dft_megatron.train [Megatron-LM flags]`: Megatron-LM's trainer with DFT.

The counterpart of Megatron-LM's `pretrain_gpt.py`, in the megatron-core wheel's convention:
`parse_megatron_args` (Megatron-LM's parser and validation plus DFT's flags) ->
`pretrain_cfg_container_from_args` -> `megatron.training.pretrain(cfg, datasets provider,
ModelType.encoder_or_decoder, forward_step, model_provider=...)`. Everything else (the
training loop, checkpoints, schedules, logging, signal handling, exit-duration, NaN checks)
is Megatron-LM's.

Before `pretrain`: the CPU bridge where there is no GPU (dft_megatron/compat), the process
group (Megatron-LM's initialization finds it and goes on), the SFT data (its size sets
--train-epochs' iteration count), the tokenizer copied into --save/tokenizer (so a
checkpoint carries it to the converters and to --eval-only), DFT's metrics hooks.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from dft_megatron.checkpoint.integrity import CheckpointError
from dft_megatron.checkpoint.paths import TOKENIZER_DIR, copy_tokenizer_files
from dft_megatron.data.sources import DataError
from dft_megatron.training.safeguards import GuardExit
from dft_megatron.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def _init_process_group(args) -> None:
    if dist.is_initialized():
        return
    if args.distributed_backend == "nccl":
        torch.cuda.set_device(args.local_rank)
    dist.init_process_group(
        backend=args.distributed_backend,
        world_size=args.world_size,
        rank=args.rank,
        timeout=timedelta(minutes=args.distributed_timeout_minutes),
    )


def _store_tokenizer(args, tokenizer) -> None:
    """--save/tokenizer: the run's Hugging Face tokenizer, once (an existing one is kept). Its
    files are copied from the --tokenizer-model folder where there is one (so the generation
    defaults of a converted model travel on), else written with save_pretrained."""
    if not (args.save and tokenizer is not None and dist.get_rank() == 0):
        return
    target = Path(args.save) / TOKENIZER_DIR
    if (target / "tokenizer_config.json").is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".tokenizer.incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    source = Path(args.tokenizer_model)
    if not copy_tokenizer_files(source if source.is_dir() else None, tmp):
        tokenizer.save_pretrained(str(tmp))
    if args.chat_template:  # the template this run used, whatever the folder's
        tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, target)


def run(argv: list[str] | None = None) -> None:
    """Parse, prepare and call Megatron-LM's `pretrain` (raises on bad input)."""
    from dft_megatron.compat.megatron_training import (
        install_megatron_training_cpu_bridge,
        install_megatron_training_fixes,
    )

    install_megatron_training_fixes()
    install_megatron_training_cpu_bridge()
    from dft_megatron.compat import install_distributed_optimizer_fixes

    install_distributed_optimizer_fixes()
    from dft_megatron.training.safeguards import install_checkpoint_guards, preflight

    install_checkpoint_guards()

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from dft_megatron.data.config import split_paths
    from dft_megatron.data.provider import DatasetsProvider
    from dft_megatron.data.sft import load_tokenizer
    from dft_megatron.models.provider import model_provider
    from dft_megatron.training.arguments import data_config, parse_megatron_args
    from dft_megatron.training.metrics import DFTMetrics, install_hooks
    from dft_megatron.training.step import forward_step

    args = parse_megatron_args(argv)
    _init_process_group(args)
    cfg = data_config(args)
    # The --save lock, the shards' hashes, the data against the checkpoint's record. The lock
    # is held until the run ends, however it ends: for a launch that is the process's exit,
    # inside a process that goes on (Megatron-LM's in-process restart) it is this return.
    lock = preflight(args, split_paths(cfg.sft_data) + split_paths(cfg.valid_data))
    try:
        hf_tokenizer = None
        if args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model:
            hf_tokenizer = load_tokenizer(args.tokenizer_model, args.chat_template)
        from megatron.training import get_tokenizer

        from dft_megatron.models.provider import model_vocab_size

        # Token ids the data may hold: the model's vocabulary (see model_vocab_size).
        vocab = model_vocab_size(args, get_tokenizer().vocab_size)
        provider = DatasetsProvider(args, cfg, hf_tokenizer, vocab)
        if args.train_epochs is not None:
            train, _ = provider.prepare()
            args.train_iters = math.ceil(args.train_epochs * len(train) / args.global_batch_size)
            if dist.get_rank() == 0:
                logger.info(
                    "--train-epochs %g: %d iterations of %d sequences",
                    args.train_epochs,
                    args.train_iters,
                    args.global_batch_size,
                )
        if args.eval_only and cfg.sft_data:
            _, valid = provider.prepare()
            args.eval_iters = math.ceil(len(valid) / args.global_batch_size)  # one pass
        _store_tokenizer(args, hf_tokenizer)
        metrics = DFTMetrics(args.log_metrics_jsonl)
        install_hooks(metrics)
        # (Its "use a ModelConfig" notice is filtered in utils/logging.setup_logging.)
        cfg_container = pretrain_cfg_container_from_args(args)
        pretrain(
            cfg_container,
            provider,
            ModelType.encoder_or_decoder,
            partial(forward_step, metrics, args.check_for_nan_in_loss_and_grad),
            model_provider=model_provider,
        )
    finally:
        if lock is not None:
            lock.release()


def _explain_exit(code) -> None:
    """One line on rank 0 for Megatron-LM's rerun state machine's exits (a NaN or Inf loss
    reproduced on rerun): what stopped the run, the likely cause, what to do."""
    from megatron.core.rerun_state_machine import (
        EXIT_CODE_FAILED_ON_RESULT_VALIDATION,
        EXIT_CODE_RESUME_TO_DISAMBIGUATE,
    )

    if code not in (EXIT_CODE_RESUME_TO_DISAMBIGUATE, EXIT_CODE_FAILED_ON_RESULT_VALIDATION):
        return
    if not dist.is_initialized() or dist.get_rank() != 0:
        return
    from megatron.training import get_args

    from dft_megatron.training.metrics import last_logged

    args = get_args()
    last = last_logged()
    where = f"iteration {args.curr_iteration + 1}" if hasattr(args, "curr_iteration") else "a step"
    hint = ""
    if last is not None:
        hint = (
            f" (at iteration {last['iteration']}: lr {last['lr']:.3g}, "
            f"grad norm {last['grad_norm']:.3g})"
        )
    saved = (
        f"Megatron-LM saved the state before it to {args.save}; a relaunch resumes there and "
        "reruns the step"
        if code == EXIT_CODE_RESUME_TO_DISAMBIGUATE and args.save
        else "no checkpoint was saved for it"
    )
    print(  # noqa: T201
        f"error: {where}: the loss was NaN or Inf and a rerun of the step gave the same, so it is "
        f"not a transient device fault; likely causes: the learning rate diverged the weights"
        f"{hint}, or a bad sample (consumed samples {args.consumed_train_samples}); {saved} "
        f"(exit code {code}); lower --lr or raise the warm-up, or skip the batch with "
        "--iterations-to-skip",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        run(argv)
    except (DataError, FileNotFoundError, CheckpointError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)  # noqa: T201
        return 2
    except GuardExit:
        raise  # logged where it stopped
    except SystemExit as e:
        _explain_exit(e.code)
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
