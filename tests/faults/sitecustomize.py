"""Fault injection for the drills in tests/training (on PYTHONPATH only in those runs).

DFT_TEST_KILL_ON_WRITE=REGEX with DFT_TEST_KILL_RANK=R: the first time a process of global
rank R (or one it started) opens a file whose path matches REGEX for writing, rank R's
process gets SIGKILL: kill -9 in the middle of a checkpoint save, at a point of the test's
choosing instead of a race against a timer. Python's audit hook sees every open().
"""

import os
import re
import signal
import sys

_pattern = os.environ.get("DFT_TEST_KILL_ON_WRITE")
_rank = os.environ.get("DFT_TEST_KILL_RANK", "0")

if _pattern and os.environ.get("RANK") == _rank:
    # The rank's own pid, inherited by the writer processes it starts.
    os.environ.setdefault("DFT_TEST_RANK_PID", str(os.getpid()))
    _regex = re.compile(_pattern)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def _hook(event, args):
        if event != "open" or not args or not isinstance(args[0], str | bytes):
            return
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE
        )
        path = os.fsdecode(args[0])
        if writing and _regex.search(path):
            sys.stderr.write(f"[fault] kill -9 of rank {_rank} at open({path!r})\n")
            sys.stderr.flush()
            os.kill(int(os.environ["DFT_TEST_RANK_PID"]), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(_hook)
