"""One job per output directory: an advisory ``fcntl`` lock on ``<output dir>/.lock``.

The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed job never blocks the next one; a live
holder makes the second job stop at once with an error naming the holder's pid and host. Linux/macOS only (no
``fcntl`` elsewhere: the lock is then skipped with a warning).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live job holds the output directory; the message names the directory and the holder."""


class RunLock:
    """``with RunLock(out_dir): ...`` holds ``out_dir/.lock`` for the duration of a job."""

    def __init__(self, directory: os.PathLike):
        self.path = Path(directory) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on this platform
            logger.warning("no fcntl on this platform: %s is not locked against a second job", self.path.parent)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent}: another job is writing this output directory ({holder}); "
                                 f"wait for it, stop it, or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
