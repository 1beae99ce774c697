"""The trainer end to end on CPU over gloo: layout parity, exact resume, checkpoints.

Reference for parity: the TP1 run from the same initial checkpoint on the same global
batches. Tolerance 1e-4 absolute on the DFT loss and the plain CE (fp32; the layouts sum
the same numbers in different orders).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.multiprocessing import ProcessRaisedException

from tests.dist import spawn

TINY = [
    "--mock-data",
    "--num-layers",
    "4",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--vocab-size",
    "200",
    "--make-vocab-size-divisible-by",
    "32",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--global-batch-size",
    "4",
    "--seed",
    "7",
]


def _train_worker(rank, world_size, argv, out):
    from dft_megatron.training.arguments import parse_args
    from dft_megatron.training.trainer import train

    cfg, given = parse_args(argv)
    records = train(cfg, given)
    if rank == 0:
        Path(out).write_text(json.dumps(records))


def run(tmp_path: Path, name: str, world_size: int, argv: list[str]) -> list[dict]:
    out = tmp_path / f"{name}.json"
    spawn(_train_worker, world_size, argv, str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialized model saved at TP1 x PP1 (--train-iters 0)."""
    path = tmp_path_factory.mktemp("init") / "ckpt"
    records = run(path.parent, "init", 1, [*TINY, "--train-iters", "0", "--save", str(path)])
    assert records == []
    assert (path / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    return path


@pytest.fixture(scope="module")
def reference(initial_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return run(tmp, "tp1", 1, _finetune(initial_checkpoint, "--micro-batch-size", "4"))


def _finetune(ckpt, *extra):
    return [*TINY, "--load", str(ckpt), "--finetune", "--train-iters", "3", *extra]


LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1"]),
    "tp2pp2_distopt": (
        4,
        [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--micro-batch-size",
            "1",
            "--use-distributed-optimizer",
        ],
    ),
    "dp2": (2, ["--micro-batch-size", "1", "--use-distributed-optimizer"]),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2_vp2": (
        2,
        [
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--micro-batch-size",
            "1",
        ],
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_tp1(layout, initial_checkpoint, reference, tmp_path):
    world, flags = LAYOUTS[layout]
    got = run(tmp_path, layout, world, _finetune(initial_checkpoint, *flags))
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for ref, rec in zip(reference, got, strict=True):
        for key in ("loss", "ce_loss", "target_prob_mean"):
            assert rec[key] == pytest.approx(ref[key], abs=1e-4), (layout, key, ref, rec)
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (layout, ref, rec)
        assert rec["tokens"] == ref["tokens"]
    # The weights moved: the last loss differs from the first.
    assert got[-1]["loss"] != got[0]["loss"]


def test_resume_is_exact(tmp_path):
    """6 iterations straight == 3, save, resume, 3 more: dropout on (RNG states restored),
    distributed optimizer over DP 2 with tied embeddings split over PP 2."""
    flags = [
        *TINY,
        "--hidden-dropout",
        "0.1",
        "--attention-dropout",
        "0.1",
        "--pipeline-model-parallel-size",
        "2",
        "--micro-batch-size",
        "1",
        "--use-distributed-optimizer",
        "--lr-decay-style",
        "cosine",
        "--lr-warmup-iters",
        "2",
        "--train-iters",
        "6",
    ]
    straight = run(tmp_path, "straight", 4, flags)
    ckpt = tmp_path / "ckpt"
    first = run(tmp_path, "first", 4, [*flags, "--save", str(ckpt), "--exit-interval", "3"])
    second = run(tmp_path, "second", 4, [*flags, "--load", str(ckpt)])
    assert [r["iteration"] for r in first + second] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, first + second, strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])

    # Another TP x PP: weights reshard, the optimizer state does not (a clear refusal).
    with pytest.raises(ProcessRaisedException, match="reloads only at that layout"):
        run(
            tmp_path,
            "tp2",
            2,
            [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "7", "--load", str(ckpt)],
        )
    resumed = run(
        tmp_path,
        "tp2",
        2,
        [
            *TINY,
            "--tensor-model-parallel-size",
            "2",
            "--train-iters",
            "7",
            "--load",
            str(ckpt),
            "--no-load-optim",
        ],
    )
    assert [r["iteration"] for r in resumed] == [4, 5, 6, 7]  # from the iteration-3 save


def test_logging_outputs(initial_checkpoint, tmp_path):
    """JSON lines with the documented keys, TensorBoard scalars and the p histogram,
    validation during training, and --eval-only's one line over the whole validation set,
    labelled with the loaded checkpoint's iteration."""
    jsonl, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    run(
        tmp_path,
        "log",
        1,
        _finetune(
            initial_checkpoint,
            "--micro-batch-size",
            "2",
            "--log-interval",
            "2",
            "--eval-interval",
            "3",
            "--eval-iters",
            "2",
            "--log-metrics-jsonl",
            str(jsonl),
            "--tensorboard-dir",
            str(tb),
            "--save",
            str(tmp_path / "ckpt"),
        ),
    )
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    train = [x for x in lines if x.get("split") != "valid"]
    valid = [x for x in lines if x.get("split") == "valid"]
    assert [x["iteration"] for x in train] == [2, 3]  # every 2nd, and the last
    for rec in train:
        for key in (
            "iteration",
            "loss",
            "ce_loss",
            "target_prob_mean",
            "grad_norm",
            "lr",
            "tokens",
            "entropy",
            "p_lt_0.01",
            "p_gt_0.99",
        ):
            assert key in rec, key
        # DFT's loss is p-weighted CE: smaller than the plain CE it is logged next to.
        assert 0 < rec["loss"] < rec["ce_loss"]
        fractions = [rec[k] for k in ("p_lt_0.01", "p_0.01_0.5", "p_0.5_0.99", "p_gt_0.99")]
        assert sum(fractions) == pytest.approx(1.0)
    assert len(valid) == 1 and valid[0]["iteration"] == 3 and not valid[0]["full_pass"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"histograms": 0}).Reload()
    assert {"train/loss", "train/ce_loss", "train/target_prob_mean", "valid/loss"} <= set(
        events.Tags()["scalars"]
    )
    hist = events.Histograms("train/target_prob")[-1].histogram_value
    assert hist.num == train[-1]["tokens"]

    only = tmp_path / "eval.jsonl"
    run(
        tmp_path,
        "eval",
        1,
        [
            *TINY,
            "--load",
            str(tmp_path / "ckpt"),
            "--eval-only",
            "--eval-iters",
            "2",
            "--log-metrics-jsonl",
            str(only),
        ],
    )
    (rec,) = [json.loads(x) for x in only.read_text().splitlines()]
    assert rec["full_pass"] and rec["ce_loss"] > rec["loss"] > 0
    assert rec["iteration"] == 3  # the iteration of the weights, not 0
    # Every validation token once: 2 global batches of 4 sequences, their loss-masked labels.
    from dft_megatron.data import MockDataset

    data = MockDataset(200, 32, seed=7 + 1, size=8)
    assert rec["tokens"] == sum(int(data[i]["loss_mask"].sum()) for i in range(8))


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_half_precision_tracks_fp32(precision, initial_checkpoint, reference, tmp_path):
    """bf16/fp16 parameters (Float16Module, fp32 main weights, fp16 loss scaling): the first
    step's DFT loss and CE match fp32's from the same weights to 2e-2 relative."""
    got = run(
        tmp_path, precision, 1, _finetune(initial_checkpoint, "--micro-batch-size", "4", precision)
    )
    for key in ("loss", "ce_loss"):
        assert got[0][key] == pytest.approx(reference[0][key], rel=2e-2), (key, got[0])
