"""Logs: repeated lines are folded (issue 13), and a stalled stderr does not hold the exit up.

The folding core (``RepeatFolder``) takes its times from the caller; the handler
takes a clock, so nothing here sleeps except the stalled-stderr test.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline._log import FoldingHandler, LogfmtFormatter, QueuedStderrHandler, Repeated, RepeatFolder
from pipeline.output import LineOutput

# -- the pure core ------------------------------------------------------------------


def test_first_is_written_repeats_counted_and_told_when_the_window_has_passed() -> None:
    folder: RepeatFolder[str, int] = RepeatFolder(window_s=10)
    assert folder.offer("boom", 0, now_s=100.0) == (True, [])
    for i in range(1, 4601):
        assert folder.offer("boom", i, now_s=100.0 + i / 1000) == (False, [])
    # Any record after the window ends it; a new window starts with a written line.
    assert folder.offer("other", -1, now_s=110.0) == (
        True,
        [Repeated(first=0, last=4600, count=4600, seconds=10)],
    )
    assert folder.offer("boom", 9999, now_s=110.5) == (True, [])


def test_a_window_with_no_repeats_ends_silently() -> None:
    folder: RepeatFolder[str, str] = RepeatFolder(window_s=10)
    assert folder.offer("a", "a1", now_s=0) == (True, [])
    assert folder.offer("a", "a2", now_s=10) == (True, [])
    assert folder.flush(now_s=12) == []


def test_keys_fold_independently_and_expire_in_order() -> None:
    folder: RepeatFolder[str, str] = RepeatFolder(window_s=10)
    folder.offer("a", "a0", now_s=0)
    folder.offer("b", "b0", now_s=5)
    folder.offer("a", "a1", now_s=6)
    folder.offer("b", "b1", now_s=7)
    folder.offer("b", "b2", now_s=8)
    assert folder.offer("c", "c0", now_s=10) == (True, [Repeated("a0", "a1", 1, 10)])
    assert folder.offer("c", "c1", now_s=14) == (False, [])
    assert folder.offer("c", "c2", now_s=15) == (False, [Repeated("b0", "b2", 2, 10)])


def test_flush_tells_every_open_window_over_the_time_it_has_run() -> None:
    folder: RepeatFolder[str, str] = RepeatFolder(window_s=10)
    folder.offer("a", "a0", now_s=0)
    folder.offer("a", "a1", now_s=0.5)
    folder.offer("b", "b0", now_s=1)
    assert folder.flush(now_s=1.5) == [Repeated("a0", "a1", 1, 1.5)]
    # Flushed windows are closed: the next one is written again.
    assert folder.offer("a", "a2", now_s=2) == (True, [])


def test_open_windows_are_bounded() -> None:
    folder: RepeatFolder[int, int] = RepeatFolder(window_s=10, max_keys=2)
    assert [folder.offer(k, k, now_s=0)[0] for k in (1, 2, 3, 3)] == [True, True, True, True]
    assert folder.offer(1, 1, now_s=1) == (False, [])


# -- the handler --------------------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(LogfmtFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


Folded = tuple[logging.Logger, FoldingHandler, _Lines, _Clock]


@pytest.fixture
def folded() -> Iterator[Folded]:
    lines, clock = _Lines(), _Clock()
    logger = logging.getLogger("bpfpipe.test_log")
    handler = FoldingHandler(lines, window_s=10, clock=clock)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, handler, lines, clock
    logger.removeHandler(handler)
    logger.propagate = True


def _fail(logger: logging.Logger, stage: str, n: int = 1, detail: str = "boom") -> None:
    for _ in range(n):
        logger.error("process() failed in stage %r: %s", stage, detail, extra={"stage": stage})


def test_a_flood_is_one_line_then_one_summary(folded: Folded) -> None:
    logger, _, lines, clock = folded
    _fail(logger, "enrich", 4601)
    assert len(lines.lines) == 1
    clock.now_s += 10
    logger.info("pipeline finished")
    first, summary, finished = lines.lines
    assert "msg=\"process() failed in stage 'enrich': boom\"" in first
    assert (
        "msg=\"process() failed in stage 'enrich': boom (repeated 4,600 times in the last 10 s)\"" in summary
    )
    assert summary.endswith("stage=enrich repeated=4600")
    assert "level=error logger=bpfpipe.test_log" in summary
    assert 'msg="pipeline finished"' in finished


def test_folding_is_by_template_level_and_stage(folded: Folded) -> None:
    logger, handler, lines, _ = folded
    _fail(logger, "a", 3, detail="one")
    _fail(logger, "a", 3, detail="two")  # same template: the same flood
    _fail(logger, "b", 3)
    logger.warning("process() failed in stage %r: %s", "a", "x", extra={"stage": "a"})
    assert len(lines.lines) == 3
    handler.flush()
    summaries = [line for line in lines.lines[3:] if "repeated=" in line]
    assert [s.rsplit(" ", 1)[1] for s in summaries] == ["repeated=5", "repeated=2"]
    assert (
        "stage 'a': one (repeated 5 times in the last 0 s; the last: process() failed in stage 'a': two)"
        in summaries[0]
    )
    assert "stage 'b': boom (repeated 2 times in the last 0 s)\"" in summaries[1]


def test_flush_writes_what_is_folded(folded: Folded) -> None:
    logger, handler, lines, clock = folded
    _fail(logger, "enrich", 3)
    clock.now_s += 1.25
    handler.flush()
    assert len(lines.lines) == 2
    assert "(repeated 2 times in the last 1.2 s)" in lines.lines[1]


# -- a stalled stderr ---------------------------------------------------------------


def test_a_stalled_stderr_costs_one_grace_period_not_one_per_line() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(write_fd, False)
        try:
            while True:
                os.write(write_fd, b"x" * 65536)
        except BlockingIOError:
            pass
        os.set_blocking(write_fd, True)
        handler = QueuedStderrHandler(LineOutput.inherited(write_fd, "stderr"), flush_timeout_s=0.2)
        handler.setFormatter(LogfmtFormatter())
        started = time.monotonic()
        for i in range(10):
            handler.handle(logging.makeLogRecord({"name": "bpfpipe.test", "msg": f"line {i}"}))
        handler.flush()
        # Before: two waits of 0.2 s per line (4 s); now the first times out and later ones do not wait.
        assert time.monotonic() - started < 1.0
        while os.read(read_fd, 1 << 20).count(b"\n") == 0:  # unstall: what was queued gets written
            pass
        assert handler.output.wait_idle(5)
        handler.close()
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_log_lines_reach_stderr_while_the_loader_captures_fd_2(tmp_path: Any) -> None:
    """The writer thread writes to a duplicate of stderr's fd: while the BPF loader
    redirects that fd to capture bcc's output (``captured_stderr``), a log line written
    meanwhile still reaches the real stderr, and the capture gets only what bcc printed.
    (Seen as shutdown step lines missing while the XDP program was being detached.)"""
    real = tmp_path / "stderr.txt"
    with open(real, "wb") as f:
        stderr_fd = os.dup(f.fileno())  # stands in for fd 2
    try:
        out = LineOutput.duplicate(stderr_fd, "stderr")
        handler = QueuedStderrHandler(out)
        handler.setFormatter(LogfmtFormatter())
        logger = logging.getLogger("bpfpipe.test.capture")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            capture = tmp_path / "capture.txt"
            with open(capture, "wb") as c:
                saved = os.dup(stderr_fd)
                os.dup2(c.fileno(), stderr_fd)  # what captured_stderr does to fd 2
                try:
                    os.write(stderr_fd, b"libbpf: a line bcc printed\n")
                    logger.warning("shutdown: drain")
                    assert out.wait_idle(5)
                finally:
                    os.dup2(saved, stderr_fd)
                    os.close(saved)
            logger.warning("shutdown: unload")
            assert out.wait_idle(5)
        finally:
            logger.removeHandler(handler)
            handler.close()
        assert capture.read_text() == "libbpf: a line bcc printed\n"
        lines = real.read_text().splitlines()
        assert [line.split('msg="')[1].split('"')[0] for line in lines] == [
            "shutdown: drain",
            "shutdown: unload",
        ]
        os.write(stderr_fd, b"")  # the original fd is still ours: duplicate() closed only its copy
    finally:
        os.close(stderr_fd)
