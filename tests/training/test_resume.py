"""Stopping and resuming a run, through Megatron-LM's own machinery, at TP2 with dropout on.

Reference: one straight 8-iteration run. Each interrupted run is relaunched with the same
command line and must continue to the straight run's per-iteration loss, CE, mean p and
grad norm (1e-6 relative: the same computation; dropout masks included, so the RNG and the
data order are restored too):
- `--save X --load X` with X empty starts fresh; `--exit-interval 4` saves and stops; the
  relaunch resumes from iteration 4;
- SIGTERM to one rank with `--exit-signal-handler`: a checkpoint is saved at the next
  iteration, the run exits 0, the relaunch continues;
- `--exit-duration-in-mins 1` on a run that would take far longer: saved at the iteration
  it stopped after, exit 0, the relaunch continues from there.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.launch import rank_processes, start, train, wait

MODEL = [
    "--num-layers", "2",
    "--hidden-size", "64",
    "--num-attention-heads", "4",
    "--seq-length", "32",
    "--max-position-embeddings", "32",
    "--vocab-size", "256",
    "--hidden-dropout", "0.1",
    "--attention-dropout", "0.1",
    "--mock-data",
    "--tensor-model-parallel-size", "2",
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
    "--train-iters", "8",
    "--lr", "1e-3",
    "--loss-type", "dft",
    "--dft-min-prob", "0.05",
    "--seed", "3",
]  # fmt: skip
KEYS = ("loss", "ce_loss", "target_prob_mean", "entropy", "grad_norm")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = train(tmp_path_factory.mktemp("straight"), "straight", 2, MODEL)
    assert [r["iteration"] for r in run.train] == list(range(1, 9))
    return {r["iteration"]: r for r in run.train}


def _continues(straight, *runs) -> None:
    """The runs' iterations (the first of each relaunch after the previous one's last) are the
    straight run's, and together cover 1..8."""
    seen = {}
    for run in runs:
        for r in run.train:
            seen[r["iteration"]] = r
    assert sorted(seen) == list(range(1, 9))
    for it, r in seen.items():
        for key in KEYS:
            assert r[key] == pytest.approx(straight[it][key], rel=1e-6), (it, key)


def test_empty_load_starts_fresh_then_resumes(straight, tmp_path):
    ckpt = tmp_path / "ckpt"  # does not exist yet
    flags = [*MODEL, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "4"]
    first = train(tmp_path, "first", 2, [*flags, "--exit-interval", "4"])
    assert [r["iteration"] for r in first.train] == [1, 2, 3, 4]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    second = train(tmp_path, "second", 2, flags)
    assert [r["iteration"] for r in second.train] == [5, 6, 7, 8]
    _continues(straight, first, second)


def test_sigterm_saves_and_relaunch_continues(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*MODEL, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "1000"]
    flags += ["--exit-signal-handler"]
    proc, metrics, log = start(tmp_path, "signalled", 2, flags)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the signal:\n{log.read_text()[-3000:]}"
    ranks = rank_processes(proc)
    assert len(ranks) == 2
    ranks[0].send_signal(signal.SIGTERM)
    signalled = wait(proc, metrics, log, 240)
    assert signalled.returncode == 0, signalled.tail()
    done = [r["iteration"] for r in signalled.train]
    assert 2 <= done[-1] < 8, done
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved == done[-1]
    relaunch = train(tmp_path, "relaunch", 2, [*flags])
    assert relaunch.train[0]["iteration"] == saved + 1
    _continues(straight, signalled, relaunch)


def test_exit_duration_saves_and_relaunch_continues(tmp_path):
    """Megatron-LM's --exit-duration-in-mins counts whole minutes: a 1-minute limit on a run
    that would take much longer. Exact continuation is the other tests' (the same save)."""
    ckpt = tmp_path / "ckpt"
    flags = [*MODEL, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "100000"]
    flags += ["--tensor-model-parallel-size", "1"]
    endless = [*flags, "--train-iters", "1000000"]
    endless += ["--log-interval", "1"]
    timed = train(tmp_path, "timed", 1, [*endless, "--exit-duration-in-mins", "1"], timeout=240)
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 0 < saved < 1000000
    assert "exiting program after" in timed.output
    # The same schedule (Megatron-LM refuses a changed --train-iters on resume), stopped
    # two iterations on.
    relaunch = train(tmp_path, "relaunch", 1, [*endless, "--exit-interval", str(saved + 2)])
    assert [r["iteration"] for r in relaunch.train] == [saved + 1, saved + 2]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(straight, tmp_path, mode):
    """Rank 1 is killed (SIGKILL) as it opens its shard of the iteration-4 checkpoint
    (tests/faults/sitecustomize.py): the tracker still names iteration 2, the half-written
    iter_0000004 is not taken for a checkpoint, and the relaunch continues from 2 to the
    straight run's losses, saving iteration 4 anew over the incomplete one."""
    from dft_megatron.checkpoint.integrity import is_complete
    from tests.launch import ROOT

    ckpt = tmp_path / "ckpt"
    flags = [*MODEL, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"]
    if mode == "async":
        flags.append("--async-save")
    fault = {
        "PYTHONPATH": f"{ROOT / 'tests' / 'faults'}:{ROOT}",
        "DFT_TEST_KILL_ON_WRITE": r"iter_0000004/__1_\d+\.distcp",
        "DFT_TEST_KILL_RANK": "1",
    }
    killed = train(tmp_path, "killed", 2, flags, expect_ok=False, env=fault)
    assert killed.returncode != 0
    assert "[fault] kill -9 of rank 1" in killed.output, killed.tail()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000004").is_dir() and not is_complete(ckpt / "iter_0000004")
    relaunch = train(tmp_path, "relaunch", 2, flags)
    assert relaunch.train[0]["iteration"] == 3
    _continues(straight, killed, relaunch)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert is_complete(ckpt / "iter_0000004")
