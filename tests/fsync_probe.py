"""``imontage-train`` with the checkpoint store's fsyncs counted on rank 0, and a SIGKILL at one of them.

Run by tests/test_kill.py under torchrun: ``FSYNC_LOG`` collects "index path" lines; with
``KILL_AT_FSYNC=k`` rank 0 kills itself with SIGKILL just before its k-th fsync, that is in the
middle of a checkpoint save, at a point the test chose from the log of an earlier run.
"""

import os
import signal
import sys
from pathlib import Path

from imontage.checkpoint import store as checkpoint
from imontage.train.cli import main

LOG = os.environ.get("FSYNC_LOG", "")
KILL_AT = int(os.environ.get("KILL_AT_FSYNC", "0"))
RANK = os.environ.get("RANK", "0")
_original = checkpoint._fsync
_count = 0


def _probe(path: Path) -> None:
    global _count
    if RANK == "0":
        _count += 1
        if LOG:
            with open(LOG, "a", encoding="utf-8") as log:
                log.write(f"{_count} {path}\n")
        if _count == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
    _original(path)


checkpoint._fsync = _probe
sys.exit(main(sys.argv[1:]))
