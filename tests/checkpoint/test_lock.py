"""The --save lock: a second holder is refused with the first one's identity; a dead
holder's lock (kill -9) is free again although its file stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dft_megatron.checkpoint.lock import LOCK_FILE, SaveFolderInUseError, SaveLock

HOLD = """
import sys, time
from dft_megatron.checkpoint.lock import SaveLock
SaveLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_holder_is_refused_until_the_first_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            SaveFolderInUseError, match=rf"in use by another run \(pid {holder.pid} "
        ):
            SaveLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()  # left behind by the killed holder
    lock = SaveLock(tmp_path)
    assert lock.acquire()
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    time.sleep(0)  # released: another acquire succeeds
    assert SaveLock(tmp_path).acquire()
