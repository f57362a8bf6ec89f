"""One exclusive file lock for everything two runs could do to one cache at once."""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class LockBusy(TimeoutError):
    """Another process held the lock for longer than the caller would wait."""

    def __init__(self, path: Path, waited: float) -> None:
        super().__init__(f"{path} is locked by another process; waited {waited:.0f} s")
        self.path = path
        self.waited = waited


@contextmanager
def exclusive(path: Path, *, wait_s: float | None = None, poll_s: float = 0.2) -> Iterator[IO[str]]:
    """flock(2) on `path` (created if needed); the kernel drops it if the holder dies.

    wait_s None waits as long as it takes; a number gives up with LockBusy after that
    many seconds (0: one try), polling every poll_s. Yields the lock file, opened for
    appending, for a holder that wants to say who it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if wait_s is None:
            fcntl.flock(f, fcntl.LOCK_EX)
        else:
            start = time.monotonic()
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= wait_s:
                        raise LockBusy(path, waited) from None
                    time.sleep(min(poll_s, max(0.01, wait_s - waited)))
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
