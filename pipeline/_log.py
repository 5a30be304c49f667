"""Structured logs: one logfmt line per event on stderr (events go to stdout).

Logging never blocks the event loop: lines go to a bounded queue that a daemon
thread writes to stderr (:class:`pipeline.output.LineOutput`). When stderr does
not keep up and the queue is full, lines are dropped and counted, and the next
line that fits is preceded by one saying how many were lost. Outside the event
loop (start-up, shut-down) a line waits for the queue to drain, so stderr keeps
its order with what the CLI prints itself. At exit
(``logging.shutdown``) what is queued gets a short grace period to reach stderr;
once stderr has missed that grace period, later lines do not wait for it again
until it has caught up (a stalled reader must not hold the exit up line by line).

Floods are folded (:class:`RepeatFolder`, :class:`FoldingHandler`): a stage that
fails every batch would otherwise write the same line thousands of times a second.
The first record with a given (logger, level, message template, ``stage``) is
written; further ones within ``window_s`` (10 s) are only counted; when the window
has passed (seen on the next record of any kind) or at flush (the end of a run,
exit), one line says ``<message> (repeated 4,600 times in the last 10 s)`` with a
``repeated=`` field (and ``; the last: <message>`` if the last one's text differs).
Only the log is folded: stage error counters count every one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from .output import LineOutput

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

FOLD_WINDOW_S = 10.0
"""How long repeats of a log line are counted before one line reports them."""

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Repeated(Generic[T]):
    """Occurrences that were counted, not written, after ``first`` was written."""

    first: T
    last: T
    count: int
    seconds: float
    """The span they were counted over: the window, or less if flushed before it ended."""


@dataclass(slots=True)
class _Window(Generic[T]):
    first: T
    last: T
    start_s: float
    count: int = 0


class RepeatFolder(Generic[K, T]):
    """Which of a stream of keyed occurrences to write: the pure core of folding.

    ``offer(key, item, now_s)`` says whether to write ``item`` and which
    :class:`Repeated` summaries are due before it. The first occurrence of a key
    opens a window of ``window_s`` and is written; later ones inside it are
    counted. A window that has passed is closed at the next ``offer`` (of any key),
    or by ``flush``; it yields a summary if anything was counted. Times come from
    the caller (a monotonic clock), so this is tested without one.

    At most ``max_keys`` windows are open; past that, new keys are written unfolded
    (memory stays bounded whatever the messages are)."""

    def __init__(self, window_s: float = FOLD_WINDOW_S, *, max_keys: int = 1024) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        # In opening order, so (with a monotonic clock) the oldest window comes first.
        self._windows: dict[K, _Window[T]] = {}

    def offer(self, key: K, item: T, now_s: float) -> tuple[bool, list[Repeated[T]]]:
        due = self.expire(now_s)
        window = self._windows.get(key)
        if window is not None:
            window.count += 1
            window.last = item
            return False, due
        if len(self._windows) < self.max_keys:
            self._windows[key] = _Window(item, item, now_s)
        return True, due

    def expire(self, now_s: float) -> list[Repeated[T]]:
        """Close the windows that have passed; summaries of those that counted repeats."""
        due: list[Repeated[T]] = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now_s - window.start_s < self.window_s:
                break
            del self._windows[key]
            if window.count:
                due.append(Repeated(window.first, window.last, window.count, self.window_s))
        return due

    def flush(self, now_s: float) -> list[Repeated[T]]:
        """Close every window (the end of a run); summaries of those that counted repeats."""
        due = [
            Repeated(w.first, w.last, w.count, min(self.window_s, max(0.0, now_s - w.start_s)))
            for w in self._windows.values()
            if w.count
        ]
        self._windows.clear()
        return due


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
        self._stalled = False
        """A wait for stderr timed out and it has not caught up since."""

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
            self._wait_idle()
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
            self._wait_idle()

    def _wait_idle(self) -> None:
        if self._stalled and not self.output.wait_idle(0):
            return  # it missed one grace period already: do not wait again per line
        self._stalled = not self.output.wait_idle(self.flush_timeout_s)

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
        self._wait_idle()

    def close(self) -> None:  # logging.shutdown() has just called flush()
        self.output.close_nowait()
        super().close()


def _fold_key(record: logging.LogRecord) -> Hashable:
    stage = getattr(record, "stage", None)
    return (record.name, record.levelno, str(record.msg), str(stage) if stage is not None else None)


class FoldingHandler(logging.Handler):
    """Folds repeated records (see :class:`RepeatFolder`) on their way to ``inner``.

    Created after ``inner``, so ``logging.shutdown`` (newest handler first) flushes
    the last summaries into ``inner`` before closing it."""

    def __init__(
        self,
        inner: logging.Handler,
        *,
        window_s: float = FOLD_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.folder: RepeatFolder[Hashable, logging.LogRecord] = RepeatFolder(window_s)
        self._clock = clock

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock: summaries and the record stay in order.
        write, due = self.folder.offer(_fold_key(record), record, self._clock())
        for repeated in due:
            self.inner.handle(_summary(repeated))
        if write:
            self.inner.handle(record)

    def flush(self) -> None:
        self.acquire()
        try:
            for repeated in self.folder.flush(self._clock()):
                self.inner.handle(_summary(repeated))
        finally:
            self.release()
        self.inner.flush()

    def close(self) -> None:
        self.flush()
        self.inner.close()
        super().close()


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format; say what we can
        return str(record.msg)


def _summary(repeated: Repeated[logging.LogRecord]) -> logging.LogRecord:
    """The first record's message and fields, with the count; the last one's text too if
    it differs (one template can carry different details, e.g. "primary"/"fallback")."""
    first = repeated.first
    message, last = _message(first), _message(repeated.last)
    told = f"repeated {repeated.count:,} times in the last {repeated.seconds:.2g} s"
    if last != message:
        told += f"; the last: {last}"
    extra = {k: v for k, v in vars(first).items() if k not in _STANDARD}
    return logging.makeLogRecord(
        {
            **extra,
            "name": first.name,
            "levelno": first.levelno,
            "levelname": first.levelname,
            "msg": f"{message} ({told})",
            "repeated": repeated.count,
        }
    )


def flush_logging() -> None:
    """Write what is folded or queued (the end of a run, before its report)."""
    for handler in logging.getLogger("bpfpipe").handlers:
        handler.flush()


def _stderr_handler() -> logging.Handler:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no fd (tests capture it)
        return logging.StreamHandler(sys.stderr)
    sys.stderr.flush()
    # A duplicate: the BPF loader redirects fd 2 for a moment to capture bcc's output,
    # and a line the writer thread wrote meanwhile would end up in that capture.
    return QueuedStderrHandler(LineOutput.duplicate(fd, "stderr", max_queued_bytes=1024 * 1024))


def setup_logging(level: str) -> None:
    inner = _stderr_handler()
    inner.setFormatter(LogfmtFormatter())
    root = logging.getLogger("bpfpipe")
    root.handlers[:] = [FoldingHandler(inner)]
    root.setLevel(level.upper())
    root.propagate = False


def set_log_level(level: str) -> None:
    """Change the level of every ``bpfpipe`` logger while running (a live reload)."""
    logging.getLogger("bpfpipe").setLevel(level.upper())
