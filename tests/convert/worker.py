"""The processes of tests/convert/test_conversion.py: `python -m tests.convert.worker STEP WORK`.

- `convert` (one process, as tools/convert_*.py run): every import and export of the tests in
  one Megatron-LM process (sessions one after another): llama through the import CLI with
  --verify, again without --force (refused) and with --force; mistral and qwen2 through the
  library; each exported back to HF in 100KB shards; verification of a wrong model; the
  trainer's model config at a TP size that does not divide the attention heads, or whose
  query groups are neither a multiple nor a divisor of it. Results in WORK/convert.json.
- `layouts` (under torch.distributed.run, 4 processes): each import loaded at TP1, TP2, PP2,
  TP2 x PP2 and TP4 (DP fills the rest) as the trainer does it (Megatron-LM's arguments from
  the checkpoint, `initialize_megatron`, `get_model` with the trainer's model provider,
  Megatron-LM's `load_checkpoint`); one forward through Megatron-Core's pipeline schedule
  for the logits (gathered over TP) and one through the trainer's own `forward_step` for the
  CE. Results in WORK/{family}_tp{TP}_pp{PP}.pt.

Conversion saves with dist_checkpointing, which starts a spawn multiprocessing manager that
imports this module again: nothing runs at import.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
from functools import partial
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2")
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1))  # (TP, PP) on 4 processes
SEQ, BATCH = 16, 2
VOCAB = 96
ROOT = Path(__file__).resolve().parents[2]


def tokens() -> torch.Tensor:
    """[b, s + 1] token ids: inputs [:, :-1], next-token targets [:, 1:]."""
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _tool(name: str):
    """The `main` of tools/NAME.py (run without its __main__ block)."""
    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"), run_name="tool")["main"]


# ------------------------------------------------------------------ convert


def _config_error(argv: list[str], world_size: int) -> str:
    """The error of the trainer's model config (Megatron-Core's TransformerConfig, built from
    Megatron-LM's arguments as the model provider builds it) for `argv` in a world of
    `world_size` (only its size: nothing is initialized)."""
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.training import destroy_global_state

    from dft_megatron.training.arguments import parse_megatron_args

    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0")
    try:
        args = parse_megatron_args(argv, training=False)
        try:
            core_transformer_config_from_args(args)
        except (ValueError, AssertionError) as e:
            return str(e)
        return ""
    finally:
        destroy_global_state()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def convert(work: Path) -> None:
    from dft_megatron.compat.megatron_training import install_megatron_training_cpu_bridge
    from dft_megatron.convert import (
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        verify_conversion,
    )

    install_megatron_training_cpu_bridge()
    results = {}
    for family in FAMILIES:
        hf, mg = work / "hf" / family, work / "mg" / family
        if family == "llama":  # through the CLI
            argv = ["--hf-dir", str(hf), "--megatron-dir", str(mg)]
            results["import_cli_verify_rc"] = _tool("convert_hf_to_megatron")([*argv, "--verify"])
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                results["import_cli_no_force_rc"] = _tool("convert_hf_to_megatron")(argv)
            results["import_cli_no_force_stderr"] = stderr.getvalue()
            results["import_cli_force_rc"] = _tool("convert_hf_to_megatron")([*argv, "--force"])
        else:
            convert_hf_to_megatron(hf, mg)
        # Small shards: the index path of the export.
        convert_megatron_to_hf(mg, work / "back" / family, max_shard_size="100KB")
    # Verification catches a wrong model: mistral's checkpoint against llama's HF folder. Both
    # hold the same random weights (same seed and shapes); only their RoPE differs.
    wrong = verify_conversion(work / "hf" / "llama", work / "mg" / "mistral")
    results["verify_wrong_model"] = [wrong.passed, wrong.max_abs_diff / wrong.max_abs_logit]
    right = verify_conversion(work / "hf" / "mistral", work / "mg" / "mistral")
    results["verify_right_model"] = [right.passed, right.max_abs_diff / right.max_abs_logit]

    load = ["--load", str(work / "mg" / "llama"), "--micro-batch-size", "1"]
    results["tp3_heads"] = _config_error([*load, "--tensor-model-parallel-size", "3"], 3)
    results["tp4_groups"] = _config_error([*load, "--tensor-model-parallel-size", "4"], 4)
    groups = ["--num-layers", "1", "--hidden-size", "96", "--num-attention-heads", "6"]
    groups += ["--group-query-attention", "--num-query-groups", "3", "--vocab-size", "96"]
    groups += ["--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "1"]
    results["tp2_groups3"] = _config_error([*groups, "--tensor-model-parallel-size", "2"], 2)
    (work / "convert.json").write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------ layouts


def _logits_step(captured: list, data_iterator, model):
    """A forward step without labels: the last stage's logits [b, s, v/tp] go to `captured`."""
    from dft_megatron.data.batches import from_stacked

    batch = from_stacked(next(data_iterator))
    output = model(batch.tokens, batch.position_ids, None)

    def loss_func(output_tensor):
        captured.append(output_tensor.detach().clone())
        return output_tensor.sum() * 0, torch.tensor(1), {}

    return output, loss_func


def layouts(work: Path) -> None:
    import torch.distributed as dist

    from dft_megatron.compat.megatron_training import (
        install_megatron_training_cpu_bridge,
        install_megatron_training_fixes,
    )

    install_megatron_training_fixes()
    install_megatron_training_cpu_bridge()
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training import checkpointing, initialize, training

    from dft_megatron.models.provider import model_provider
    from dft_megatron.training.arguments import parse_megatron_args
    from dft_megatron.training.step import forward_step

    torch.set_num_threads(1)  # 4 processes share the cores
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    ids = tokens()
    batch = {"tokens": ids, "loss_mask": torch.ones(BATCH, SEQ)}
    for family in FAMILIES:
        for tp, pp in LAYOUTS:
            dp = world // (tp * pp)
            parse_megatron_args(
                [
                    "--load", str(work / "mg" / family),
                    "--tensor-model-parallel-size", str(tp),
                    "--pipeline-model-parallel-size", str(pp),
                    "--micro-batch-size", str(BATCH),
                    "--global-batch-size", str(BATCH * dp),
                    "--seq-length", str(SEQ),
                    "--loss-type", "sft",
                ],
                training=False,
            )  # fmt: skip
            # Looked up through the modules: the CPU bridge wraps them.
            initialize.initialize_megatron()
            chunks = training.get_model(
                model_provider, ModelType.encoder_or_decoder, wrap_with_ddp=False
            )
            checkpointing.load_checkpoint(chunks, None, None, strict=True)
            for chunk in chunks:
                chunk.eval()
            schedule = get_forward_backward_func()
            common = dict(
                model=chunks,
                num_microbatches=1,
                seq_length=SEQ,
                micro_batch_size=BATCH,
                forward_only=True,
            )
            captured: list[torch.Tensor] = []
            with torch.no_grad():
                schedule(
                    forward_step_func=partial(_logits_step, captured),
                    data_iterator=iter([batch]),
                    **common,
                )
                reports = schedule(
                    forward_step_func=partial(forward_step, None, False),
                    data_iterator=iter([batch]),
                    **common,
                )
            if parallel_state.is_pipeline_last_stage():
                group = parallel_state.get_tensor_model_parallel_group()
                parts = [torch.empty_like(captured[0]) for _ in range(tp)]
                dist.all_gather(parts, captured[0].contiguous(), group=group)
                ce_sum, count = reports[0]["ce loss"].tolist()
                if parallel_state.get_tensor_model_parallel_rank() == 0 and (
                    parallel_state.get_data_parallel_rank() == 0
                ):
                    torch.save(
                        {"logits": torch.cat(parts, -1), "ce": ce_sum / count, "tokens": count},
                        work / f"{family}_tp{tp}_pp{pp}.pt",
                    )
            del chunks
            training.destroy_global_state()
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    step, folder = sys.argv[1], Path(sys.argv[2])
    {"convert": convert, "layouts": layouts}[step](folder)
