"""The SLURM drill: examples/pretrain_gpt_dft.sbatch on a real one-node SLURM cluster.

tests/slurm/local_slurm.sh starts munged, slurmctld and slurmd (Debian's slurm-wlm 22.05,
installed by .ci/run; the drill is skipped where they are not installed or not root). The
job is the sbatch script as a user submits it, with `--gpus-per-node=0` (the node has no
GPU) and the CPU defaults of examples/pretrain_gpt_dft.sh (TP 2 on 2 processes). Mid-run the
batch script gets SIGUSR1, the signal its `--signal=B:USR1@600` line asks SLURM to send
before the time limit, delivered here at once with `scancel --batch --signal=USR1`: the ranks
must save and exit 0, the script requeue the job, and the second run continue from the
checkpoint to exactly the losses of an uninterrupted run of examples/pretrain_gpt_dft.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.launch import ROOT

SCRIPT = Path(__file__).with_name("local_slurm.sh")
ITERS = 40
KEYS = ("loss", "ce_loss", "target_prob_mean", "grad_norm")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    or os.geteuid() != 0,
    reason="needs SLURM and munge installed (apt-get install slurmctld slurmd slurm-client "
    "munge) and root to start them",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))  # short: unix socket paths
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(base)], capture_output=True, text=True, timeout=120
    )
    if started.returncode != 0:
        logs = "\n".join(p.read_text()[-2000:] for p in (base / "log").glob("*.log"))
        pytest.fail(f"the SLURM cluster did not start:\n{started.stderr}\n{logs}")
    try:
        yield {**os.environ, "SLURM_CONF": str(base / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(base)], timeout=120, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") != "valid"]


def _job_state(env: dict, job: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def test_time_limit_warning_saves_requeues_and_continues(cluster, tmp_path):
    common = {
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "TRAIN_ITERS": str(ITERS),
        "SAVE_INTERVAL": "100000",  # the only mid-run save is the signal's
    }
    quiet = ["--eval-interval", "100000"]  # the CPU default validates every 2 iterations
    straight_metrics = tmp_path / "straight.jsonl"
    straight = subprocess.run(
        [
            "bash",
            "examples/pretrain_gpt_dft.sh",
            *quiet,
            "--log-metrics-jsonl",
            str(straight_metrics),
        ],
        cwd=ROOT,
        env={**os.environ, **common, "MASTER_PORT": str(_free_port())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    reference = {r["iteration"]: r for r in _records(straight_metrics)}
    assert sorted(reference) == list(range(1, ITERS + 1))

    save, metrics = tmp_path / "ckpt", tmp_path / "job.jsonl"
    env = {**cluster, **common, "SAVE": str(save), "MASTER_PORT": str(_free_port())}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--chdir={ROOT}"]
        + [f"--output={tmp_path}/%x-%j.out", "--job-name=drill"]
        + ["examples/pretrain_gpt_dft.sbatch", *quiet, "--log-metrics-jsonl", str(metrics)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    out = tmp_path / f"drill-{job}.out"

    deadline = time.monotonic() + 300
    while len(_records(metrics)) < 3:
        state = _job_state(env, job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, out.read_text()[-3000:])
        assert time.monotonic() < deadline, "the job logged no iterations"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)

    deadline = time.monotonic() + 480
    while (state := _job_state(env, job)) != "COMPLETED":
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (
            state,
            out.read_text()[-4000:],
        )
        assert time.monotonic() < deadline, f"still {state}:\n{out.read_text()[-4000:]}"
        time.sleep(0.5)

    log = out.read_text()
    assert "requeueing job" in log and "run 2," in log, log[-3000:]
    assert (
        "Restarts=1"
        in subprocess.run(
            ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
        ).stdout
    )
    records = _records(metrics)  # both runs (the second appends)
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1)), "a gap or a repeat"
    (stopped,) = map(int, re.findall(r"saving checkpoint at iteration\s+(\d+)", log)[:1])
    assert 3 <= stopped < ITERS and "exiting program after receiving SIGTERM" in log
    assert re.search(rf"loading distributed checkpoint from \S+ at iteration {stopped}\b", log)
    for r in records:
        for key in KEYS:
            assert r[key] == pytest.approx(reference[r["iteration"]][key], rel=1e-6), (
                r["iteration"],
                key,
            )
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
