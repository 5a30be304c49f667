"""A small tmpfs for tests of full and read-only filesystems (one helper for every kind).

Mounting needs root. Without it the test is skipped with that reason locally, and
*fails* under ``CI=true`` — like the BPF tests (``tests/conftest.py``), CI never passes
by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from _tools import require


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, options: str = "size=64k") -> Iterator[Path]:
    """A tmpfs mounted at ``directory`` (created if missing) for the ``with`` block."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    directory.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)
