"""The user-space side of bpfpipe.h's heartbeat: a kernel event the agent makes itself.

Each loaded program gets its own *key* (a positive 31-bit number above the valid
``PRIO_*`` values, chosen by the loader and compiled in with the agent's tgid as
``-DBPFPIPE_HEARTBEAT_KEY`` / ``-DBPFPIPE_HEARTBEAT_TGID``). Calling
``getpriority(key, marker)`` from the agent then fires the program's
``syscalls:sys_enter_getpriority`` tracepoint, which emits one heartbeat record
carrying ``marker`` into that program's ring buffer — and into no other program's,
and for no other process. The syscall itself fails with EINVAL and changes
nothing. :class:`KernelHeartbeat` is what a ring-buffer source publishes as its
:class:`pipeline.HeartbeatSource`.
"""

from __future__ import annotations

import errno
import os
import secrets

__all__ = ["HEARTBEAT_ATTACH_POINT", "KernelHeartbeat", "heartbeat_cflags", "new_heartbeat_key"]

HEARTBEAT_ATTACH_POINT = "tracepoint:syscalls:sys_enter_getpriority"
"""Where a program that registers the heartbeat (bpfpipe.h) is attached."""

_MIN_KEY = 1 << 20
"""Far above PRIO_PROCESS/PGRP/USER (0..2): the kernel rejects the call at once."""


def new_heartbeat_key() -> int:
    """A fresh key for one program load (unique in practice: 31 random bits)."""
    return _MIN_KEY + secrets.randbelow((1 << 31) - _MIN_KEY)


def heartbeat_cflags(key: int, tgid: int) -> list[str]:
    return [f"-DBPFPIPE_HEARTBEAT_KEY={key}", f"-DBPFPIPE_HEARTBEAT_TGID={tgid}"]


class KernelHeartbeat:
    """Triggers one loaded program's heartbeat (a :class:`pipeline.HeartbeatSource`)."""

    def __init__(self, program: str, key: int, tgid: int) -> None:
        self.program = program
        self.key = key
        self.tgid = tgid

    def __repr__(self) -> str:
        return f"<KernelHeartbeat of {self.program!r}>"

    def trigger_heartbeat(self, marker: int) -> None:
        """Make the program emit a heartbeat carrying ``marker`` (taken mod 2**31:
        ``who`` is a C int).
        From the process that loaded the program only (the kernel checks the tgid)."""
        if os.getpid() != self.tgid:
            raise RuntimeError(f"heartbeats of {self.program!r} come only from process {self.tgid}")
        try:
            os.getpriority(self.key, marker & 0x7FFFFFFF)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return  # expected: the tracepoint has fired
            raise
        raise RuntimeError(f"getpriority({self.key}, ...) succeeded: not a heartbeat key")
