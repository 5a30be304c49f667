"""Signals outside trio for the ``bpfpipe`` command, and its one-line messages.

Light on purpose (standard library only): ``pipeline.cli.main`` installs these
handlers before the heavy imports, so a stop signal at any moment after the
interpreter has started is one line and an exit code, never a traceback. Inside
``trio.run`` the handler only records; trio's own signal receiver takes over.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from types import FrameType
from typing import Any

__all__ = [
    "HUP_MESSAGE",
    "STOP_SIGNALS",
    "Interrupted",
    "SignalState",
    "install_signal_handlers",
    "one_line",
    "say",
]

log = logging.getLogger("bpfpipe.cli")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HUP_MESSAGE = "SIGHUP before the pipeline runs (or after it): not reloading; carrying on"


def say(message: str) -> None:
    """Print one line for people on stderr, after any log lines still queued."""
    if "pipeline._log" in sys.modules:  # logging set up: flush what it has queued
        from ._log import flush_logging

        flush_logging()
    print(message, file=sys.stderr)


def one_line(text: str) -> str:
    """``text`` with its line breaks collapsed, so an error is always one line."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


class Interrupted(BaseException):
    """Raised by our signal handler outside trio; not an Exception, so nothing on the
    way (a plug-in's ``except Exception``) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class SignalState:
    """Signals that arrived while trio was not listening. Inside ``trio.run`` the
    handler only records (trio's own receiver takes over once ``_run`` opens it)."""

    received: int | None = None
    deferred = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGHUP:
        log.warning(HUP_MESSAGE)
        return
    if SignalState.received is None:
        SignalState.received = signum
    if not SignalState.deferred:
        raise Interrupted(signum)


def install_signal_handlers() -> dict[int, Any]:
    previous: dict[int, Any] = {}
    for signum in (*STOP_SIGNALS, signal.SIGHUP):
        previous[signum] = signal.signal(signum, _on_signal)
    SignalState.received = None
    SignalState.deferred = False
    return previous
