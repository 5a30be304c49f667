"""Structured logs: one logfmt line per event on stderr (events go to stdout).

Logging never blocks the event loop: lines go to a bounded queue that a daemon
thread writes to stderr (:class:`pipeline.output.LineOutput`). When stderr does
not keep up and the queue is full, lines are dropped and counted, and the next
line that fits is preceded by one saying how many were lost. Outside the event
loop (start-up, shut-down) a line waits for the queue to drain, so stderr keeps
its order with what the CLI prints itself. At exit
(``logging.shutdown``) what is queued gets a short grace period to reach stderr.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import trio

from .output import LineOutput

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in vars(record).items() if k not in _STANDARD]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class QueuedStderrHandler(logging.Handler):
    """Writes formatted records through a :class:`LineOutput`; drops (and counts) what
    does not fit instead of waiting."""

    def __init__(self, output: LineOutput, *, flush_timeout_s: float = 2.0) -> None:
        super().__init__()
        self.output = output
        self.flush_timeout_s = flush_timeout_s
        self.dropped_lines = 0
        """Lines dropped since the last notice."""
        self.dropped_total = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        # Outside the event loop (start-up, shut-down) nothing can stall but us: write
        # in order with what is queued and with what the CLI prints to stderr next.
        in_loop = trio.lowlevel.in_trio_run()
        if not in_loop:
            self.output.wait_idle(self.flush_timeout_s)
        # Handler.handle holds self.lock here, so notice and line stay in order.
        if self.dropped_lines:
            notice = self._dropped_notice(record)
            if not self.output.write_nowait(notice):
                self._drop()
                return
            self.dropped_lines = 0
        if not self.output.write_nowait(line):
            self._drop()
        elif not in_loop:
            self.output.wait_idle(self.flush_timeout_s)

    def _drop(self) -> None:
        self.dropped_lines += 1
        self.dropped_total += 1

    def _dropped_notice(self, record: logging.LogRecord) -> bytes:
        notice = logging.makeLogRecord(
            {
                "name": "bpfpipe.log",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "dropped %d log lines: stderr was not keeping up",
                "args": (self.dropped_lines,),
                "created": record.created,
                "msecs": record.msecs,
                "dropped_lines": self.dropped_lines,
            }
        )
        return (self.format(notice) + "\n").encode()

    def flush(self) -> None:
        self.output.wait_idle(self.flush_timeout_s)

    def close(self) -> None:  # logging.shutdown() has just called flush()
        self.output.close_nowait()
        super().close()


def _stderr_handler() -> logging.Handler:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no fd (tests capture it)
        return logging.StreamHandler(sys.stderr)
    sys.stderr.flush()
    return QueuedStderrHandler(LineOutput.inherited(fd, "stderr", max_queued_bytes=1024 * 1024))


def setup_logging(level: str) -> None:
    handler = _stderr_handler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("bpfpipe")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
