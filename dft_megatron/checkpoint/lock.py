"""One writer per --save folder.

Two runs saving into one folder overwrite each other's iteration folders and tracker; the
checkpoint left is a mix of both. `SaveLock(save).acquire()` (global rank 0, before anything
is written) takes an exclusive `flock` on SAVE/.dft_megatron.lock and writes who holds it
(host, pid, SLURM job, start time, command). The kernel drops the lock when the process dies,
kill -9 included, so a stale lock file never blocks a relaunch; the file's text is only for
the message a second run prints. Filesystems without locks (some NFS mounts) get a warning:
the folder is then unguarded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".dft_megatron.lock"


class SaveFolderInUseError(Exception):
    pass


class SaveLock:
    def __init__(self, save: str | Path):
        self.path = Path(save) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "another process"
        job = f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else ""
        return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}"

    def acquire(self) -> bool:
        """Take the lock; raises SaveFolderInUseError when another live run holds it. Returns
        False (with a warning) where the filesystem has no locks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SaveFolderInUseError(
                f"--save {self.path.parent} is in use by another run ({self.holder()}): two runs "
                "saving into one folder overwrite each other's checkpoints; stop that run, or "
                "give this one another --save"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                logger.warning(
                    "%s: this filesystem has no file locks (%s): a second run on the same "
                    "--save folder will not be detected",
                    self.path,
                    e.strerror,
                )
                return False
            raise
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd  # held (open) until release() or the process's exit
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
