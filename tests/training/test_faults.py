"""Drills: what a run does on a cluster's bad days (the README's fault table cites each test).

Every drill is the trainer as a user runs it (torchrun, CPU processes over gloo) on a small
GPT. A refused run must stop with one `error:` line per problem that names the file or flag,
exit 2, and leave the folder byte for byte as it was. The kill -9 and preemption drills are
in test_resume.py (they continue a straight run exactly); the SLURM requeue one in
test_slurm.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.launch import errors, rank_processes, start, train

MODEL = [
    "--num-layers", "2",
    "--hidden-size", "64",
    "--num-attention-heads", "4",
    "--seq-length", "32",
    "--max-position-embeddings", "32",
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
    "--lr", "1e-3",
    "--loss-type", "dft",
    "--seed", "3",
]  # fmt: skip
MOCK = [*MODEL, "--mock-data", "--vocab-size", "256"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> the SHA-256 of its bytes."""
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def tracker(save: Path) -> str:
    return (save / "latest_checkpointed_iteration.txt").read_text().strip()


def all_finite(folder: Path) -> bool:
    """Whether every floating tensor of a torch_dist checkpoint (weights, optimizer state) is
    finite, read with torch's own converter, not with the code under test. The rerun state
    machine's record of the rejected loss (NaN on purpose) is left out."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                found.append(bool(torch.isfinite(x).all()))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk({k: v for k, v in state.items() if not k.startswith("rerun_state_machine")})
    assert found, "no tensors found"
    return all(found)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """An 8-iteration run stopped after 4, with checkpoints at 2 and 4, hashed
    (--verify-integrity)."""
    work = tmp_path_factory.mktemp("saved")
    ckpt = work / "ckpt"
    flags = [*MOCK, "--train-iters", "8", "--save", str(ckpt), "--save-interval", "2"]
    train(work, "saved", 1, [*flags, "--exit-interval", "4", "--verify-integrity"])
    assert tracker(ckpt) == "4"
    return ckpt


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


SHARD = "iter_0000004/__0_0.distcp"
CORRUPTIONS = {
    # name: (what to do to the folder, extra flags, what the error names)
    "truncated shard": (lambda c: _truncate(c / SHARD), [], [SHARD, "truncated"]),
    "bit flip": (lambda c: _flip_byte(c / SHARD), [], [SHARD, "damaged", "SHA-256"]),
    "missing shard": (lambda c: (c / SHARD).unlink(), [], [SHARD, "missing"]),
    "missing index": (
        lambda c: (c / "iter_0000004/.metadata").unlink(),
        [],
        ["iter_0000004/.metadata", "missing"],
    ),
    "tracker names a missing iteration": (
        lambda c: (c / "latest_checkpointed_iteration.txt").write_text("6"),
        [],
        ["iter_0000006", "does not exist", "iterations 2, 4", "--ckpt-step"],
    ),
    "empty tracker": (
        lambda c: (c / "latest_checkpointed_iteration.txt").write_text(""),
        [],
        ["latest_checkpointed_iteration.txt", "empty", "iterations 2, 4"],
    ),
    "complete checkpoints, no tracker": (
        lambda c: (c / "latest_checkpointed_iteration.txt").unlink(),
        [],
        ["holds complete checkpoints (iterations 2, 4)", "would start from random weights"],
    ),
    "another architecture": (
        lambda c: None,
        ["--hidden-size", "128", "--num-attention-heads", "4"],
        ["another architecture", "hidden_size 64 there, 128 here", "--hidden-size"],
    ),
}


def _damaged_copy(saved: Path, tmp_path: Path, case: str):
    """A copy of the saved checkpoints with `case` done to it: (folder, extra flags, what the
    error must name, the folder's snapshot)."""
    corrupt, extra, named = CORRUPTIONS[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    corrupt(ckpt)
    return ckpt, extra, named, snapshot(ckpt)


# Through the trainer (torchrun): one case per stage that refuses (while parsing, in the
# ranks' shared hash check, after the tokenizer is built). The rest through the function
# the trainer calls while parsing, on the same copies.
THROUGH_THE_TRAINER = ("truncated shard", "bit flip", "another architecture")


@pytest.mark.parametrize("case", [c for c in CORRUPTIONS if c not in THROUGH_THE_TRAINER])
def test_damaged_checkpoint_problem_names_the_file(saved, tmp_path, case):
    from argparse import Namespace

    from dft_megatron.training.safeguards import checkpoint_problems

    ckpt, _, named, before = _damaged_copy(saved, tmp_path, case)
    (line,) = checkpoint_problems(Namespace(load=str(ckpt), save=str(ckpt), ckpt_step=None))
    for word in named:
        assert word in line, (word, line)
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("case", THROUGH_THE_TRAINER)
def test_damaged_checkpoint_is_refused_untouched(saved, tmp_path, case):
    ckpt, extra, named, before = _damaged_copy(saved, tmp_path, case)
    flags = [*MOCK, "--train-iters", "8", "--save", str(ckpt), "--load", str(ckpt), *extra]
    run = train(tmp_path, "relaunch", 1, [*flags, "--save-interval", "1"], expect_ok=False)
    assert run.returncode != 0
    lines = errors(run)
    assert len(lines) == 1, run.tail()
    for word in named:
        assert word in lines[0], (word, lines[0])
    assert not run.train  # not one step
    assert snapshot(ckpt) == before  # nothing overwritten, deleted or added


def test_undamaged_copy_resumes(saved, tmp_path):
    """The control for the drills above: the same copy, untouched, resumes at iteration 5."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    flags = [*MOCK, "--train-iters", "8", "--save", str(ckpt), "--load", str(ckpt)]
    flags += ["--save-interval", "100", "--exit-interval", "5"]
    run = train(tmp_path, "relaunch", 1, flags)
    assert [r["iteration"] for r in run.train] == [5]


def test_diverging_lr_stops_at_the_nan_without_saving_it(tmp_path):
    """A learning rate that blows the weights up: Megatron-LM's NaN check (on by default)
    catches the loss, its rerun state machine reruns the step, saves the state before it and
    exits 16; the message names the iteration and the likely cause; what is saved is finite."""
    ckpt = tmp_path / "ckpt"
    flags = [*MOCK, "--train-iters", "8", "--lr", "1e30", "--save", str(ckpt)]
    run = train(tmp_path, "diverging", 1, [*flags, "--save-interval", "100"], expect_ok=False)
    assert run.returncode != 0
    assert "Unexpected result nan" in run.output or "Unexpected result inf" in run.output
    (line,) = [x for x in errors(run) if "NaN or Inf" in x]
    assert "iteration" in line and "learning rate" in line and "exit code 16" in line, line
    saved = int(tracker(ckpt))
    assert saved == len(run.train)  # the state after the last good step
    assert all_finite(ckpt / f"iter_{saved:07d}")


def test_nan_weights_are_never_saved(tmp_path):
    """The same divergence with Megatron-LM's checks off: the weights turn NaN and the save
    at the next interval is refused (exit 17), the last checkpoint stays the tracker's."""
    ckpt = tmp_path / "ckpt"
    flags = [*MOCK, "--train-iters", "6", "--lr", "1e30", "--save", str(ckpt)]
    flags += ["--save-interval", "1", "--no-check-for-nan-in-loss-and-grad"]
    run = train(tmp_path, "unchecked", 1, flags, expect_ok=False)
    assert run.returncode != 0
    assert "not saving a model with NaN or Inf weights" in run.output, run.tail()
    assert not any("the loss was NaN or Inf" in x for x in errors(run))  # not a rerun's stop
    saved = int(tracker(ckpt))
    assert saved >= 1 and all_finite(ckpt / f"iter_{saved:07d}")
    refused = ckpt / f"iter_{saved + 1:07d}"
    assert not refused.exists()


def test_fp16_overflow_skips_the_step(tmp_path):
    """fp16 with a loss scale that overflows the gradients: Megatron-LM's dynamic scaler skips
    those steps (halving the scale) and then trains; the skipped ones are marked in the
    metrics, and the weights stay finite."""
    ckpt = tmp_path / "ckpt"
    flags = [*MOCK, "--train-iters", "6", "--fp16", "--initial-loss-scale", "4194304"]
    run = train(tmp_path, "fp16", 1, [*flags, "--save", str(ckpt), "--save-interval", "6"])
    skipped = [r["skipped"] for r in run.train]
    assert skipped[0] and not skipped[-1], skipped
    assert all(r["loss"] == r["loss"] for r in run.train if not r["skipped"])  # not NaN
    assert all_finite(ckpt / "iter_0000006")


def _sft_flags(work: Path) -> tuple[list[str], Path]:
    from tests.data.conftest import make_tokenizer

    tok = work / "tok"
    make_tokenizer(tok)
    data = work / "train.jsonl"
    rows = [{"prompt": f"What is {i} + 2?", "response": f"{i + 2}"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [*MODEL, "--tokenizer-model", str(tok), "--sft-data", str(data)]
    flags += ["--data-cache-path", str(work / "cache"), "--loss-type", "sft"]
    flags += ["--seq-length", "128", "--max-position-embeddings", "128"]  # a chat template
    return flags, data


def test_changed_sft_data_under_resume_is_refused(tmp_path):
    flags, data = _sft_flags(tmp_path)
    ckpt = tmp_path / "ckpt"
    flags += ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"]
    train(tmp_path, "first", 1, [*flags, "--train-iters", "4", "--exit-interval", "2"])
    assert tracker(ckpt) == "2"
    with data.open("a") as f:  # one more row: every later position of the order moves
        f.write(json.dumps({"prompt": "What is 9 + 9?", "response": "18"}) + "\n")
    before = snapshot(ckpt)
    refused = train(tmp_path, "edited", 1, [*flags, "--train-iters", "4"], expect_ok=False)
    (line,) = errors(refused)
    assert str(data.resolve()) in line and "changed since the save" in line, line
    assert "--allow-data-change" in line
    assert not refused.train and snapshot(ckpt) == before
    allowed = train(tmp_path, "allowed", 1, [*flags, "--train-iters", "4", "--allow-data-change"])
    assert [r["iteration"] for r in allowed.train] == [3, 4]
    assert "--allow-data-change" in allowed.output  # the warning that names the file


def test_second_writer_is_refused_and_a_killed_ones_lock_is_not(tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*MOCK, "--save", str(ckpt), "--save-interval", "100000"]
    first, metrics, log = start(tmp_path, "first", 1, [*flags, "--train-iters", "100000"])
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never logged an iteration"
            time.sleep(0.2)
        second = train(tmp_path, "second", 1, [*flags, "--train-iters", "2"], expect_ok=False)
        (line,) = errors(second)
        assert (
            "is in use by another run" in line and f"pid {rank_processes(first)[0].pid}" in line
        ), line
        assert not second.train
    finally:  # kill -9 of the whole job (torchrun starts its ranks in their own sessions)
        for p in psutil.Process(first.pid).children(recursive=True):
            p.kill()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (ckpt / ".dft_megatron.lock").is_file()
    third = train(tmp_path, "third", 1, [*flags, "--train-iters", "2"])
    assert [r["iteration"] for r in third.train] == [1, 2]


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB tmpfs: one checkpoint of MOCK (1.7 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_keeps_the_previous_checkpoint(small_disk, tmp_path):
    ckpt = small_disk / "ckpt"
    flags = [*MOCK, "--train-iters", "4", "--save", str(ckpt), "--save-interval", "2"]
    run = train(tmp_path, "full", 1, flags, expect_ok=False)
    assert run.returncode != 0
    assert "the disk is full" in run.output and "the tracker still names iteration 2" in run.output
    assert tracker(ckpt) == "2"
    elsewhere = tmp_path / "elsewhere"
    resumed = train(
        tmp_path,
        "resumed",
        1,
        [*MOCK, "--train-iters", "4", "--load", str(ckpt), "--save", str(elsewhere)]
        + ["--save-interval", "100"],
    )
    assert [r["iteration"] for r in resumed.train] == [3, 4]
