"""A real, small tmpfs for full-disk tests, and filling it to its last byte."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. "64m") at ``mount_point`` for the block (needs CAP_SYS_ADMIN; the test is
    skipped, with the reason, where mounting is not allowed); unmounted after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],  # noqa: S603, S607 - fixed arguments
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)  # noqa: S603, S607 - fixed arguments


def fill(mount_point: Path) -> Path:
    """Fill the file system to its last byte; returns the ballast file (delete it to free the space).

    Unbuffered, so ENOSPC surfaces in ``write``, not in ``close``."""
    ballast = mount_point / "ballast"
    with open(ballast, "wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return ballast
