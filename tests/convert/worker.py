"""The processes of tests/convert/test_conversion.py: `python -m tests.convert.worker STEPS
WORK` runs the comma-separated STEPS in one process (under torch.distributed.run for all but
`convert`), in order, each leaving its results under WORK for the tests to compare.

- `convert` (one process, as tools/convert_*.py run; Megatron-LM sessions one after
  another): llama imported through the import CLI with --verify, again without --force
  (refused) and with --force; mistral and qwen2 through the library; each exported back to
  HF in 100KB shards; the import CLI's --verify on a wrong model (two layers swapped);
  verification of mistral's checkpoint against llama's HF folder; the qwen3_moe import saved
  with --moe-grouped-gemm in its args (as a GPU run's) and exported; the trainer's model config
  at a TP size that does not divide the attention heads or query groups. WORK/convert.json.
- `layouts` (4 processes: the persistent ranks of tests/dist.py's pool, through `pooled`):
  each import loaded as the trainer loads it (Megatron-LM's arguments from the checkpoint,
  `initialize_megatron`, `get_model` with the trainer's model provider, Megatron-LM's
  `load_checkpoint`) at TP1, TP2, PP2, TP2 x PP2 (llama also TP4; DP fills the rest; the MoE
  families also EP2 and TP2 x EP2 through both token dispatchers, TP2 x EP2 with expert-TP 1
  and PP2 x EP2); one forward through Megatron-Core's pipeline schedule for the logits
  (gathered over TP) and one through the trainer's own `forward_step` / `loss_func` for the
  CE; the process groups destroyed after each. WORK/{family}_{layout}.pt.
- `eval_only`, `train` (4 processes): `python -m dft_megatron.train`'s entry in this process
  on the qwen2 import at TP2 x PP2 over WORK/rows.jsonl: --eval-only (WORK/eval_only.jsonl);
  2 steps of fine-tuning saved at iteration 2 to WORK/trained and validated there
  (WORK/train.jsonl).

Conversion and training save with dist_checkpointing, which starts a spawn multiprocessing
manager that imports this module again: nothing runs at import, and torch is imported where
it is used (that process needs none of it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")


@dataclass(frozen=True)
class Layout:
    """A parallel layout on 4 processes (DP fills the rest)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # --expert-tensor-parallel-size; None: Megatron-LM's default (TP)
    dispatcher: str = "alltoall"  # --moe-token-dispatcher-type (MoE models only)

    @property
    def name(self) -> str:
        name = f"tp{self.tp}_pp{self.pp}"
        if self.ep > 1:
            name += f"_ep{self.ep}" + (f"_etp{self.etp}" if self.etp else "")
            name += f"_{self.dispatcher}"
        return name

    def flags(self, moe: bool) -> list[str]:
        flags = ["--tensor-model-parallel-size", str(self.tp)]
        flags += ["--pipeline-model-parallel-size", str(self.pp)]
        if moe:
            flags += ["--expert-model-parallel-size", str(self.ep)]
            flags += ["--moe-token-dispatcher-type", self.dispatcher]
            if self.etp:
                flags += ["--expert-tensor-parallel-size", str(self.etp)]
            if self.tp > 1:  # Megatron-Core: MoE with TP needs sequence parallelism
                flags.append("--sequence-parallel")
        return flags


LAYOUTS = (Layout(), Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2))
MOE_LAYOUTS = (
    Layout(),
    Layout(tp=2),
    Layout(pp=2),
    Layout(ep=2),
    Layout(ep=2, dispatcher="allgather"),
    Layout(tp=2, ep=2),
    Layout(tp=2, ep=2, dispatcher="allgather"),
    Layout(tp=2, ep=2, etp=1),
    Layout(pp=2, ep=2),
)


def layouts_of(family: str) -> tuple[Layout, ...]:
    """The layouts each import is loaded at; llama's also TP4, where its 2 query groups are
    replicated over the 4 TP ranks (the other families have the same GQA shapes); the MoE
    families' with expert parallelism through both of Megatron-LM's token dispatchers, the
    experts not split over TP (expert-TP 1 at TP2) and EP with PP."""
    from tests.convert.hf_models import MOE_FAMILIES

    if family in MOE_FAMILIES:
        return MOE_LAYOUTS
    return (*LAYOUTS, Layout(tp=4)) if family == "llama" else LAYOUTS


SEQ, BATCH = 16, 2
ROOT = Path(__file__).resolve().parents[2]


def tokens(high: int | None = None, seed: int = 3):
    """[b, s + 1] token ids below `high` (the model's vocabulary): inputs [:, :-1], next-token
    targets [:, 1:]."""
    import torch

    from tests.convert.hf_models import VOCAB

    high = high or VOCAB
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (BATCH, SEQ + 1), generator=g)


def rows():
    """The trainer's pre-tokenized rows (WORK/rows.jsonl): ids the tokenizer has (the data
    check refuses the others, although the model's 96 rows would take them)."""
    from tests.convert.hf_models import CHARS, SPECIAL

    return tokens(len(SPECIAL) + len(CHARS), seed=4)  # the tokenizer's 49 of the 96


def _tool(name: str):
    """The `main` of tools/NAME.py (run without its __main__ block)."""
    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"), run_name="tool")["main"]


# ------------------------------------------------------------------ convert


def _config_error(argv: list[str], world_size: int) -> str:
    """What the trainer says about `argv` in a world of `world_size` (only its size: nothing
    is initialized): its one-line refusals (exit 2) once the --load checkpoint's args are
    known, else the error of Megatron-Core's TransformerConfig as the model provider builds
    it; "" when both accept it."""
    import contextlib
    import io

    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.training import destroy_global_state

    from dft_megatron.training.arguments import parse_megatron_args

    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0")
    try:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                args = parse_megatron_args(argv, training=False)
        except SystemExit:
            lines = printed.getvalue().splitlines()
            return "\n".join(x for x in lines if x.startswith("error: "))
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
    import torch

    from dft_megatron.compat.megatron_training import install_megatron_training_cpu_bridge
    from dft_megatron.convert import (
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        verify_conversion,
    )

    install_megatron_training_cpu_bridge()
    results = {}
    seconds = results["seconds"] = {}
    start = time.monotonic()

    def lap(name: str) -> None:
        nonlocal start
        seconds[name] = round(time.monotonic() - start, 2)
        start = time.monotonic()

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
        lap(f"import {family}")
        # Small shards: the index path of the export.
        convert_megatron_to_hf(mg, work / "back" / family, max_shard_size="100KB")
        lap(f"export {family}")
    # A checkpoint whose args say --moe-grouped-gemm, as a GPU run saves it (TEGroupedMLP,
    # whose checkpoint keys are SequentialMLP's), exports on CPU: the stored flag does not
    # carry over (the command line's value is kept).
    from megatron.training import get_args

    from dft_megatron.convert import hf_to_megatron

    save = hf_to_megatron.save_release

    def save_as_grouped_gemm(chunks, out):
        get_args().moe_grouped_gemm = True
        return save(chunks, out)

    hf_to_megatron.save_release = save_as_grouped_gemm
    try:
        convert_hf_to_megatron(work / "hf" / "qwen3_moe", work / "mg_grouped_gemm")
    finally:
        hf_to_megatron.save_release = save
    convert_megatron_to_hf(work / "mg_grouped_gemm", work / "back_grouped_gemm")
    lap("grouped-gemm args")
    # The import CLI's --verify exits 1 for a wrong model: layers 0 and 1 of the MLP output
    # projection swapped after the import copied them.
    copy = hf_to_megatron.load_hf_weights

    def copy_then_swap(plan, net):
        done = copy(plan, net)
        a, b = (net.decoder.layers[i].mlp.linear_fc2.weight for i in (0, 1))
        with torch.no_grad():
            first = a.clone()
            a.copy_(b)
            b.copy_(first)
        return done

    hf_to_megatron.load_hf_weights = copy_then_swap
    try:
        argv = ["--hf-dir", str(work / "hf" / "mistral"), "--megatron-dir", str(work / "wrong")]
        results["import_cli_wrong_model_rc"] = _tool("convert_hf_to_megatron")([*argv, "--verify"])
    finally:
        hf_to_megatron.load_hf_weights = copy
    lap("wrong model")
    # Verification catches a wrong model: mistral's checkpoint against llama's HF folder. Both
    # hold the same random weights (same seed and shapes); only their RoPE differs.
    wrong = verify_conversion(work / "hf" / "llama", work / "mg" / "mistral")
    results["verify_wrong_model"] = [wrong.passed, wrong.max_abs_diff / wrong.max_abs_logit]
    lap("verify")

    load = ["--load", str(work / "mg" / "llama"), "--micro-batch-size", "1"]
    results["tp3_heads"] = _config_error([*load, "--tensor-model-parallel-size", "3"], 3)
    results["tp4_groups"] = _config_error([*load, "--tensor-model-parallel-size", "4"], 4)
    groups = ["--num-layers", "1", "--hidden-size", "96", "--num-attention-heads", "6"]
    groups += ["--group-query-attention", "--num-query-groups", "3", "--vocab-size", "96"]
    groups += ["--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "1"]
    results["tp2_groups3"] = _config_error([*groups, "--tensor-model-parallel-size", "2"], 2)
    lap("tp checks")
    (work / "convert.json").write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------ layouts


def _logits_step(captured: list, data_iterator, model):
    """A forward step without labels: the last stage's logits [b, s, v/tp] go to `captured`."""
    import torch

    from dft_megatron.data.batches import from_stacked

    batch = from_stacked(next(data_iterator))
    output = model(batch.tokens, batch.position_ids, None)

    def loss_func(output_tensor):
        captured.append(output_tensor.detach().clone())
        return output_tensor.sum() * 0, torch.tensor(1), {}

    return output, loss_func


def _destroy_groups() -> None:
    """Destroy every process group but the world's. Megatron-LM's destroy_global_state forgets
    its groups without destroying them, and each gloo group keeps its threads: over the ~30
    layouts (an MoE layout makes a dozen groups) the processes grew to 2000 threads each."""
    import torch.distributed as dist

    dist.barrier()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)


def layouts(work: Path) -> None:
    import torch
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

    world = dist.get_world_size()
    ids = tokens()
    batch = {"tokens": ids, "loss_mask": torch.ones(BATCH, SEQ)}
    from tests.convert.hf_models import MOE_FAMILIES

    for family in FAMILIES:
        for layout in layouts_of(family):
            tp, pp = layout.tp, layout.pp
            dp = world // (tp * pp)
            parse_megatron_args(
                [
                    "--load", str(work / "mg" / family),
                    *layout.flags(family in MOE_FAMILIES),
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
            captured = []
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
                        work / f"{family}_{layout.name}.pt",
                    )
            del chunks
            training.destroy_global_state()
            _destroy_groups()


# ------------------------------------------------------------------ the trainer


def trainer_flags(work: Path) -> list[str]:
    """Pre-tokenized rows (WORK/rows.jsonl, targets: every token after the first) padded to
    --seq-length, at TP2 x PP2 on 4 processes (DP1, 2 micro-batches of 1)."""
    return [
        "--sft-data", str(work / "rows.jsonl"),
        "--no-packing",
        "--data-cache-path", str(work / "cache"),
        "--seq-length", str(SEQ + 4),
        "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "2",
        "--micro-batch-size", "1",
        "--global-batch-size", "2",
        "--loss-type", "sft",
    ]  # fmt: skip


def _trainer(argv: list[str]) -> None:
    """`python -m dft_megatron.train ARGV` in this process: its entry (`run`: parse, data,
    Megatron-LM's `pretrain`), then Megatron-LM's global state and its process groups torn
    down for the next one."""
    from megatron.training import training

    from dft_megatron.training import entry

    entry.run(argv)
    training.destroy_global_state()
    _destroy_groups()


def eval_only(work: Path) -> None:
    """--eval-only of the qwen2 import (bf16 release checkpoint, no model flags) over the rows."""
    _trainer(
        [
            "--load", str(work / "mg" / "qwen2"),
            "--eval-only",
            *trainer_flags(work),
            "--log-metrics-jsonl", str(work / "eval_only.jsonl"),
        ]
    )  # fmt: skip


def train(work: Path) -> None:
    """Fine-tune the qwen2 import (tied embeddings: split over the two stages) for 2 steps in
    fp32, saving model and optimizer at iteration 2 and validating the saved weights on the
    rows there."""
    _trainer(
        [
            "--load", str(work / "mg" / "qwen2"),
            "--finetune",
            *trainer_flags(work),
            "--valid-data", str(work / "rows.jsonl"),
            "--train-iters", "2",
            "--lr", "1e-3",
            "--lr-decay-style", "constant",
            "--eval-interval", "2",
            "--eval-iters", "1",
            "--save", str(work / "trained"),
            "--save-interval", "2",
            "--log-interval", "1",
            "--log-metrics-jsonl", str(work / "train.jsonl"),
        ]
    )  # fmt: skip


STEPS = {"convert": convert, "layouts": layouts, "eval_only": eval_only, "train": train}


def pooled(rank: int, world_size: int, steps: str, work: str) -> None:
    """The distributed steps in a rank of tests/dist.py's pool, whose process group is made."""
    for step in steps.split(","):
        STEPS[step](Path(work))


def main(steps: str, work: Path) -> None:
    """Run the comma-separated `steps` in this process, in order."""
    distributed = "WORLD_SIZE" in os.environ and any(s != "convert" for s in steps.split(","))
    if distributed:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # 4 processes share the cores
        dist.init_process_group("gloo")
    for step in steps.split(","):
        STEPS[step](work)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
