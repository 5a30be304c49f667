"""Off-loop output: whole lines appended to a file or an inherited fd (stdout, stderr).

Theory of operation. A :class:`LineOutput` owns one daemon writer thread and a
queue bounded in bytes. The trio side calls ``write(2)`` only for the quick appends
to a file of the second point below:

* ``await out.write(chunks)`` waits (trio-side, cancellable) for room in the queue,
  hands the chunks to the thread and waits until they are written or failed. A
  stalled reader of stdout is therefore ordinary back-pressure on the sink, and
  signals and cancellation keep working: a cancelled caller returns at once while
  the thread may stay blocked in ``write(2)`` (it is a daemon thread).
* Except an append of up to ``inline_max_bytes`` to a regular file we opened,
  while the thread is idle: that ``write(2)`` only copies into the page cache, and
  the thread cost more than it saved. Its hop woke the event loop when it finished,
  and its copy read lines the encoder had just written on the other CPU. Measured
  2026-12-03, the jsonl sink into an ext4 file: at 1 k events/s (ten 100-event
  batches a second) 21.5-22 against 17-19.5 ms of CPU a second; at 1 M/s 0.95
  against 0.71 µs per event (the kernel's copy was 38 % of the agent's CPU). So it
  is written inline, timed: ``inline_slow_limit`` in a row that take longer than
  ``inline_slow_s`` (the kernel throttling a writer that outruns the disk) send this
  output back to its thread for good.
* ``out.write_nowait(data)`` is for lossy outputs (logs): it queues if there is
  room and otherwise returns False without waiting.

Invariants (for regular files it opened itself; stdout is written as a stream):

* The file holds whole lines only. Each ``write`` is one unit: if it cannot be
  written entirely (ENOSPC, EIO, a short write), the file is truncated back to where
  the unit started and the call raises, so callers count exactly what is on disk.
* Appending to a file whose last line is torn (a crash, another writer) starts
  with a newline, so our first line is whole.
* Output that is gone for good (EPIPE, ENOSPC, EDQUOT, EFBIG, EIO) raises
  :class:`pipeline.SinkClosed`; other ``OSError``\\s are raised as they are.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
import trio.testing

from .errors import SinkClosed

__all__ = ["CLOSED_ERRNOS", "LineOutput", "appendable_problem"]

CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
"""``errno``\\s meaning the output is gone for good (raised as ``SinkClosed``)."""

_log = logging.getLogger("bpfpipe.output")


def appendable_problem(path: str, *, create_parents: bool = False) -> str | None:
    """Why ``path`` cannot be opened for appending, or None if it looks writable.

    Checked without opening it (so ``bpfpipe check`` creates nothing). With
    ``create_parents``, a missing directory is fine if its nearest existing
    ancestor is a writable directory."""
    if os.path.isdir(path):
        return f"{path} is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        if not create_parents:
            return f"directory {parent} does not exist"
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None


@dataclass(eq=False)
class _Job:
    chunks: Sequence[bytes]
    nbytes: int
    notify: Callable[[], None] | None = None
    error: OSError | None = None
    done: bool = False
    drop_cache_to: int = -1
    """Not a write: let go of the page cache of the file up to here (see ``cache_window_bytes``)."""


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    wake: Callable[[], None]
    woken: bool = field(default=False)


class LineOutput:
    """An append-only stream of whole lines, written by a daemon thread.

    Use :meth:`open` for a file (created if missing, parents with
    ``create_parents``) or :meth:`inherited` for an fd we do not own (stdout).
    ``max_queued_bytes`` bounds what waits in the queue; a single write larger
    than that is still taken when the queue is empty."""

    def __init__(self, fd: int, name: str, *, owned: bool, max_queued_bytes: int = 8 * 1024 * 1024) -> None:
        self.name = name
        self.max_queued_bytes = max_queued_bytes
        self._fd = fd
        self._owned = owned
        self._close_fd_too = owned
        """Close ``_fd`` when done: a file we opened, or a private duplicate."""
        self._origin_fd = fd
        """The fd given to us (``duplicate``: the one duplicated), silenced on EPIPE."""
        mode = os.fstat(fd).st_mode
        # Only files we opened (O_APPEND, we know where our unit starts) are truncated back.
        self._regular = owned and stat.S_ISREG(mode)
        self.size_bytes = os.fstat(fd).st_size if self._regular else 0
        """Bytes in the file (regular files; what we know reached it)."""
        self._needs_newline = self._regular and self.size_bytes > 0 and _last_byte(name) != b"\n"
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._queued_bytes = 0
        self._waiters: deque[_Waiter] = deque()
        self._closing = False
        self._closed_error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._exited = threading.Event()
        self._inline = self._regular
        """Write small units inline while the thread is idle (regular files we opened)."""
        self._slow_inline = 0
        """Inline writes in a row slower than ``inline_slow_s``."""
        self._cache_mark = self.size_bytes
        """The file's size when the page cache was last let go of (up to the mark before)."""

    @classmethod
    def open(
        cls, path: str, *, create_parents: bool = False, max_queued_bytes: int = 8 * 1024 * 1024
    ) -> LineOutput:
        if create_parents:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            return cls(fd, path, owned=True, max_queued_bytes=max_queued_bytes)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def inherited(cls, fd: int, name: str, *, max_queued_bytes: int = 8 * 1024 * 1024) -> LineOutput:
        """An fd someone else owns (never closed by us), e.g. ``sys.stdout.fileno()``."""
        return cls(fd, name, owned=False, max_queued_bytes=max_queued_bytes)

    @classmethod
    def duplicate(cls, fd: int, name: str, *, max_queued_bytes: int = 8 * 1024 * 1024) -> LineOutput:
        """Like :meth:`inherited`, but writing to a private duplicate of ``fd`` (closed
        by us): lines keep reaching where ``fd`` pointed when this was made, also while
        something ``dup2()``s over ``fd`` itself — as the BPF loader does with fd 2 to
        capture what bcc and libbpf print (``bpf.diagnostics.captured_stderr``)."""
        copy = os.dup(fd)  # non-inheritable (PEP 446): children do not get it
        try:
            out = cls(copy, name, owned=False, max_queued_bytes=max_queued_bytes)
        except BaseException:
            os.close(copy)
            raise
        out._close_fd_too = True
        out._origin_fd = fd
        return out

    inline_max_bytes = 1 << 20
    """Largest write done inline (see the module docstring): about 0.8 ms of copying here."""
    inline_slow_s = 0.005
    """An inline write slower than this counts as slow (see ``inline_slow_limit``)."""
    inline_slow_limit = 3
    """This many inline writes in a row slower than ``inline_slow_s`` end inline writing for
    this output. One is not enough: a process that is not run for a few milliseconds (a
    busy host) makes one write slow, and the thread costs more for good (the jsonl sink at
    1 k events/s: 14.1 against 13.3 ms of CPU a second, one 20 s run each). A writer the
    kernel throttles is slow write after write."""

    cache_window_bytes = 64 << 20
    """Appended bytes kept in the page cache: each time this much more is written, the file
    up to where it was the time before is dropped from it (``posix_fadvise(DONTNEED)``,
    as ``dd oflag=nocache``; what is still dirty is written back first). An agent's
    output is read once, later, by someone else; kept, it grew the page cache by the
    output rate (charged to the agent's memory cgroup), and growing it was the largest
    cost of writing: measured 2026-12-03 on this VM, appending fresh 600 KiB buffers
    to ext4 cost 1.59 ns of system time per byte, 0.33 with a 64 MiB window."""

    spin_s = 0.02
    """Under an autojumping ``MockClock`` only (tests): how long ``write`` keeps the loop
    running (yielding) before it sleeps until the thread is done. Such a clock takes a
    loop with every task asleep for idle time and jumps ahead, firing timeouts while
    the thread writes; the real clock does not, and there spinning burns the CPU for
    the whole of every write (small while writes are fast: at 1 k events/s into a
    file it was within the noise, 42 against 40 ms of CPU a second; up to 20 ms a
    write when they are slow)."""

    @property
    def inline(self) -> bool:
        """Whether small units are still written inline (False for outputs that never
        are, and once ``inline_slow_limit`` slow writes in a row sent writing to the thread)."""
        return self._inline

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    # -- trio side ------------------------------------------------------------------
    async def write(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks`` (whole lines) as one unit; return once they are written.

        Raises ``SinkClosed`` if the output is gone, ``OSError`` for other failures;
        either way nothing of this unit is left in a regular file."""
        nbytes = sum(len(c) for c in chunks)
        if self._inline and nbytes <= self.inline_max_bytes:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._write_inline(chunks):
                await trio.lowlevel.cancel_shielded_checkpoint()  # written: no Cancelled now
                return
        token = trio.lowlevel.current_trio_token()
        while True:
            room = trio.Event()
            with self._cond:
                self._raise_if_closed()
                if self._fits(nbytes):
                    done = trio.Event()
                    job = _Job(chunks, nbytes, notify=_notifier(token, done.set))
                    self._put(job)
                    break
                waiter = _Waiter(nbytes, _notifier(token, room.set))
                self._waiters.append(waiter)
            try:
                await room.wait()
            finally:
                with self._cond:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        try:
            # Spin (yielding) while the write is expected to be quick: the run stays
            # busy, so trio's MockClock autojump does not mistake a file write for idle
            # time. A slow write (a stalled reader) then waits without using the CPU.
            if _autojumping():
                give_up = time.monotonic() + self.spin_s
                while not job.done and time.monotonic() < give_up:
                    await trio.lowlevel.checkpoint()
            if not job.done:
                await done.wait()
        except trio.Cancelled:
            with self._cond:  # not started yet: take it back so nothing is written later
                if job in self._queue:
                    self._queue.remove(job)
                    self._queued_bytes -= job.nbytes
            raise
        if job.error is not None:
            raise _as_closed(self.name, job.error) from job.error

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Let the thread finish what is queued, then close the fd if we own it.
        Waits at most ``timeout_s`` (a stuck write is left to the daemon thread)."""
        self.close_nowait()
        if self._thread is not None and self._owned and not self._busy:  # busy: a write we gave up on
            if _autojumping():  # see spin_s
                give_up = time.monotonic() + self.spin_s
                while not self._exited.is_set() and time.monotonic() < give_up:
                    await trio.lowlevel.checkpoint()
            if not self._exited.is_set():
                with trio.move_on_after(timeout_s):
                    await trio.to_thread.run_sync(self._exited.wait, abandon_on_cancel=True)

    def _write_inline(self, chunks: Sequence[bytes]) -> bool:
        """Write ``chunks`` now if the thread has nothing queued or in hand; False if it
        has (the caller queues them behind, keeping the order). Raises as ``write``."""
        with self._cond:
            self._raise_if_closed()
            if self._queue or self._busy:
                return False
            self._busy = True  # the thread, and other callers, wait for us
        started = time.monotonic()
        error: OSError | None = None
        try:
            self._write_all(chunks)
        except OSError as exc:
            error = exc
        finally:
            took = time.monotonic() - started
            with self._cond:
                self._busy = False
                if error is not None and error.errno in CLOSED_ERRNOS:
                    self._closed_error = error
                if self._closing and self._thread is None:  # closed meanwhile (another thread)
                    self._close_fd()
                self._wake_waiters()
                self._cond.notify_all()
        if took <= self.inline_slow_s:
            self._slow_inline = 0
        else:
            self._slow_inline += 1
            if self._slow_inline >= self.inline_slow_limit:
                self._inline = False
                _log.debug(
                    "%s: %d writes in a row took over %.0f ms (the last %.1f ms), writing from a "
                    "thread from now on",
                    self.name,
                    self._slow_inline,
                    self.inline_slow_s * 1000,
                    took * 1000,
                )
        if error is not None:
            raise _as_closed(self.name, error) from error
        return True

    # -- any thread -----------------------------------------------------------------
    def write_nowait(self, data: bytes) -> bool:
        """Queue ``data`` if there is room; False (nothing queued) if not, or if the
        output is closed. Never waits and never reports write errors."""
        with self._cond:
            if self._closed_error is not None or self._closing or not self._fits(len(data)):
                return False
            self._put(_Job((data,), len(data)))
            return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until everything queued has been written (or failed); for exit paths."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close_nowait(self) -> None:
        with self._cond:
            self._closing = True
            if self._thread is None and not self._busy:  # busy: an inline write closes it after
                self._close_fd()
            self._cond.notify_all()

    # -- internals ------------------------------------------------------------------
    _busy = False

    def _fits(self, nbytes: int) -> bool:
        return (not self._queue and not self._busy) or self._queued_bytes + nbytes <= self.max_queued_bytes

    def _raise_if_closed(self) -> None:
        if self._closed_error is not None:
            raise _as_closed(self.name, self._closed_error)
        if self._closing:
            raise SinkClosed(f"{self.name}: closed")

    def _put(self, job: _Job) -> None:
        self._queue.append(job)
        self._queued_bytes += job.nbytes
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"bpfpipe-output {self.name}", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _close_fd(self) -> None:
        if self._close_fd_too and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    # Not while an inline write is in hand (``_busy`` set by the trio side).
                    self._cond.wait_for(lambda: bool(self._queue or self._closing) and not self._busy)
                    if not self._queue:
                        self._close_fd()
                        return
                    job = self._queue.popleft()
                    self._busy = True
                    failed = self._closed_error
                if job.drop_cache_to >= 0:
                    self._drop_cache(job.drop_cache_to)
                elif failed is None:
                    try:
                        self._write_all(job.chunks)
                    except OSError as exc:
                        job.error = exc
                        if exc.errno in CLOSED_ERRNOS:
                            failed = exc
                else:
                    job.error = failed
                with self._cond:
                    self._busy = False
                    self._queued_bytes -= job.nbytes
                    if failed is not None:
                        self._closed_error = failed
                    job.done = True
                    self._wake_waiters()
                    self._cond.notify_all()
                if job.notify is not None:
                    job.notify()
        finally:
            self._exited.set()

    def _wake_waiters(self) -> None:
        while self._waiters and (self._closed_error is not None or self._fits(self._waiters[0].nbytes)):
            waiter = self._waiters.popleft()
            waiter.wake()

    def _write_all(self, chunks: Sequence[bytes]) -> None:
        if self._needs_newline:
            chunks = [b"\n", *chunks]
        start = self.size_bytes
        written = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(self._fd, view)
                    if n <= 0:  # a regular file that takes nothing is full
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view = view[n:]
                    written += n
        except OSError as exc:
            if written and self._regular:
                os.ftruncate(self._fd, start)  # back to the last whole line
            elif written:
                self._needs_newline = True  # a torn line on a pipe: start the next one fresh
            if exc.errno == errno.EPIPE and not self._owned:
                _silence(self._origin_fd)
            raise
        self._needs_newline = False
        if self._regular:
            self.size_bytes = start + written
            if self.size_bytes - self._cache_mark >= self.cache_window_bytes:
                mark, self._cache_mark = self._cache_mark, self.size_bytes
                if threading.current_thread() is self._thread:
                    self._drop_cache(mark)
                else:  # an inline write: the thread does it (it starts writeback: not on the loop)
                    with self._cond:
                        self._put(_Job((), 0, drop_cache_to=mark))

    def _drop_cache(self, end: int) -> None:
        """Drop the file up to ``end`` from the page cache: the kernel writes back what is
        still dirty there and drops what is clean (a page still being written stays, and
        goes the next time), so nothing is lost, only uncached."""
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or a file system without it
            os.posix_fadvise(self._fd, 0, end, os.POSIX_FADV_DONTNEED)


def _autojumping() -> bool:
    clock = trio.lowlevel.current_clock()
    return isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold != math.inf


def _last_byte(path: str) -> bytes:
    """The file's last byte (our fd is write-only); a newline if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)
    except OSError:
        return b"\n"


def _notifier(token: trio.lowlevel.TrioToken, fn: Callable[[], None]) -> Callable[[], None]:
    def notify() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn)

    return notify


def _as_closed(name: str, exc: OSError) -> OSError | SinkClosed:
    if exc.errno in CLOSED_ERRNOS:
        return SinkClosed(f"{name}: {exc.strerror or exc}")
    return exc


def _silence(fd: int) -> None:
    """Point an inherited fd whose reader is gone (``bpfpipe run | head``) at /dev/null,
    so the interpreter's final flush of that stream does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        _log.debug("could not silence fd %d", fd)
