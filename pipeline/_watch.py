"""Reload the config when its file changes: the way Kubernetes updates a ConfigMap.

The kubelet never edits a mounted file in place. It writes a new timestamped
directory, points the ``..data`` symlink at it (one atomic ``rename``), and the
file the agent was given (``bpfpipe.toml -> ..data/bpfpipe.toml``) now resolves
somewhere else. An editor saving in place changes the inode or mtime instead.
So the watcher compares the file's *identity* — where its path resolves, its
device, inode, size and mtime — and, after a change, waits until the identity
has stayed the same for ``debounce_s`` (an editor writing in two steps, or a
kubelet swapping several files, gives one reload, not two) before calling
``on_change`` (the lifecycle's validated reload: a broken file is rejected there
and the old config kept).

Polling, not inotify: inotify on the symlinked path misses the ``..data`` swap
unless the whole directory is watched and the events re-resolved. The stat calls
cost nothing measurable; what a look costs is the task's wake-up (tens of µs of
cold interpreter, even on the shared tick), so it looks twice a second. A change
is seen within ``interval_s`` and applied ``debounce_s`` later: under a second
with the defaults.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .ticks import sleep_to_next_tick

__all__ = ["ConfigWatcher", "FileIdentity", "file_identity"]

log = logging.getLogger("bpfpipe.reload")


@dataclass(frozen=True, slots=True)
class FileIdentity:
    target: str
    device: int
    inode: int
    size: int
    mtime_ns: int


def file_identity(path: str) -> FileIdentity | None:
    """What ``path`` is now (None while it is missing: mid-swap, or deleted)."""
    try:
        target = os.path.realpath(path)
        st = os.stat(target)
    except OSError:
        return None
    return FileIdentity(target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigWatcher:
    """A pipeline helper: ``await on_change()`` once per settled change of ``path``."""

    def __init__(
        self,
        path: str,
        on_change: Callable[[], Awaitable[Any]],
        *,
        interval_s: float = 0.5,
        debounce_s: float = 0.3,
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.interval_s = interval_s
        self.debounce_s = debounce_s
        self.changes = 0
        """Settled changes seen (each gave one ``on_change`` call)."""

    async def run(
        self, pipe: object = None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        current = file_identity(self.path)
        task_status.started()
        while True:
            await sleep_to_next_tick(self.interval_s)
            seen = file_identity(self.path)
            if seen == current or seen is None:
                continue
            # Changed: wait until it holds still, then reload once.
            while True:
                await trio.sleep(self.debounce_s)
                settled = file_identity(self.path)
                if settled == seen:
                    break
                seen = settled
            if seen is None:
                continue
            current = seen
            self.changes += 1
            # The count in the text keeps consecutive changes from folding into one log line.
            log.info(
                f"config file changed ({self.changes}): reloading",
                extra={"path": self.path, "target": seen.target},
            )
            await self.on_change()
