"""sd_notify: tell a supervisor (systemd ``Type=notify``) how startup and shutdown go.

The protocol is one datagram per message to the unix socket named by
``$NOTIFY_SOCKET`` (a filesystem path, or an abstract name when it starts with
``@``), holding newline-separated ``KEY=value`` lines: ``READY=1`` once the agent
serves, ``STATUS=...`` at every lifecycle step, ``STOPPING=1`` when shutdown
begins, ``WATCHDOG=1`` keep-alives. systemd's own ``sd_notify(3)`` is a few lines
of C; so is this, without a dependency (the maintained Python packages wrap
libsystemd or add nothing these lines do not).

Rules: no ``$NOTIFY_SOCKET`` means nothing is sent, silently. A send that fails
(the supervisor went away, a full queue) is dropped and counted in
:attr:`Notifier.failed`, never raised: the agent's work does not depend on its
supervisor hearing it. The watchdog is on when ``$WATCHDOG_USEC`` is a positive
integer and ``$WATCHDOG_PID`` is unset or this process's pid (``sd_watchdog_enabled``);
:meth:`Notifier.run_watchdog` then pings every half period from the trio loop, so
a loop that hangs stops the pings and the supervisor restarts the agent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import trio

__all__ = ["Notifier", "notify_address", "watchdog_interval_s"]


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names (abstract names as bytes), or None."""
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # unset, empty, or a kind of address (vsock) this agent does not speak


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or None when off."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1e6


class Notifier:
    """Sends sd_notify messages; every method is a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = notify_address(environ)
        self.watchdog_interval_s = (
            watchdog_interval_s(environ, os.getpid() if pid is None else pid) if self.address else None
        )
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; True if it was handed to the kernel."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={' '.join(text.split())}")  # one line: STATUS ends at a newline

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    async def run_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every half period until cancelled (returns at once when off)."""
        interval = self.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
