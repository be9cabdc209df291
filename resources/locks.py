"""Cross-process file locks (flock) shared by the warehouse and the index store."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class LockTimeout(TimeoutError):
    """The lock was not granted in time; the message names the lock file."""


@contextlib.contextmanager
def file_lock(path: Path, *, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold an flock on ``path`` (exclusive or shared) for the block; polls so it can time out.

    flock locks belong to the open file, so two opens in one process exclude each other too:
    never nest an exclusive lock inside another lock on the same file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive or not path.exists():
            raise
        fd = os.open(path, os.O_RDONLY)  # readers of a read-only home can still share the lock
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout
    delay = 0.01
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"timed out after {timeout:.0f} s waiting for the lock {path}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        yield
    finally:
        os.close(fd)  # closing the file releases the flock
