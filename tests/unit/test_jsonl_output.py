"""Output never blocks the loop, never tears a line, and fails early when it cannot be opened.

JsonLinesSink / SpoolSink over ``pipeline.LineOutput``: a stalled reader is
back-pressure (the loop keeps running, cancellation works), a full disk leaves only
whole lines (``delivered`` == lines on disk) and stops the pipeline gracefully, and
an unwritable path is a ``ConfigError`` at build time.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio
from _tmpfs import mounted_tmpfs

import pipeline.output
from pipeline import Batch, ConfigError, LineOutput, NodeSpec, Outcome, Pipeline, SinkClosed, load_config
from pipeline.testing import TestingSource, TestingSourceConfig, make_batch
from stages.jsonl_sink import JsonLinesConfig, JsonLinesSink
from stages.spool_sink import SpoolConfig, SpoolSink

IN_CI = os.environ.get("CI") == "true"


def batches(n_batches: int, size: int) -> list[Batch]:
    return [
        make_batch(seq=i, value=100 + np.arange(i * size, (i + 1) * size), comm=np.full(size, b"cat"))
        for i in range(n_batches)
    ]


async def run_sink(path: Path | str, items: list[Batch], sink_cls: type = JsonLinesSink) -> Pipeline:
    config = JsonLinesConfig(path=str(path)) if sink_cls is JsonLinesSink else SpoolConfig(path=str(path))
    pipe = Pipeline(
        [
            NodeSpec("source", TestingSource, TestingSourceConfig(tuple(items))),
            NodeSpec("out", sink_cls, config),
        ],
        [4],
    )
    await pipe.run()
    return pipe


def outcomes(pipe: Pipeline) -> dict[tuple[str, str], int]:
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0
    out = {("delivered", ""): ledger.total(Outcome.DELIVERED)}
    out.update({(d["outcome"], d["reason"]): d["count"] for d in ledger.as_dict()["detail"]})  # type: ignore[union-attr]
    return out


def whole_lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a torn last line"
    return [json.loads(line) for line in data.splitlines()]


# -- the line format: event name, wall-clock time, fields, weight -----------------------------

HEADER = [("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")]
EXEC = np.dtype(
    [
        *HEADER,
        ("pid", "<u4"),
        ("ppid", "<u4"),
        ("uid", "<u4"),
        ("filename_len", "<u4"),
        ("comm", "S16"),
        ("filename", "S256"),
    ]
)
EXIT = np.dtype(
    [
        *HEADER,
        ("pid", "<u4"),
        ("ppid", "<u4"),
        ("uid", "<u4"),
        ("exit_code", "<i4"),
        ("lifetime_ns", "<u8"),
        ("comm", "S16"),
    ]
)
BOOT_NS = 1_796_232_000_000_000_000  # 2026-12-02T17:20:00Z: CLOCK_MONOTONIC's zero, as Unix time


def test_exec_and_exit_lines_name_their_type_and_carry_the_wall_clock_time() -> None:
    from stages.jsonl_sink import JsonLinesEncoder

    execs = np.array([(1, 3, 1, 3_600_123_456_789, 4242, 1, 1000, 7, b"ls", b"/usr/bin/ls")], EXEC)
    exits = np.array([(2, 3, 4, 3_600_125_000_000, 4242, 1, 1000, 0, 1_543_211, b"ls")], EXIT)
    encoder = JsonLinesEncoder(clock_offset_ns=BOOT_NS)
    assert encoder.encode(execs, np.ones(1), "exec") == (
        b'{"event":"exec","time":"2026-12-02T18:20:00.123456789Z","type":1,"cpu":3,"rate":1,'
        b'"ts_ns":3600123456789,"pid":4242,"ppid":1,"uid":1000,"filename_len":7,"comm":"ls",'
        b'"filename":"/usr/bin/ls","weight":1.0}\n'
    )
    assert encoder.encode(exits, np.array([4.0]), "exit") == (
        b'{"event":"exit","time":"2026-12-02T18:20:00.125000000Z","type":2,"cpu":3,"rate":4,'
        b'"ts_ns":3600125000000,"pid":4242,"ppid":1,"uid":1000,"exit_code":0,'
        b'"lifetime_ns":1543211,"comm":"ls","weight":4.0}\n'
    )
    # Unnamed, no ts_ns: exactly records() (what every line was before).
    plain = make_batch(pid=[7])
    assert encoder.encode(plain.events, plain.weights) == b'{"pid":7,"weight":1.0}\n'


def test_the_clock_offset_is_measured_once_and_turns_monotonic_into_unix_time() -> None:
    from stages.jsonl_sink import JsonLinesEncoder, monotonic_offset_ns

    assert JsonLinesEncoder().clock_offset_ns == monotonic_offset_ns() == monotonic_offset_ns()
    events = np.array([(time.monotonic_ns(),)], dtype=[("ts_ns", "<u8")])
    [line] = json.loads(b"[" + JsonLinesEncoder().encode(events, np.ones(1)).rstrip() + b"]")
    stamp = datetime.datetime.fromisoformat(line["time"][:26] + "+00:00")  # microseconds: enough
    assert abs(stamp.timestamp() - time.time()) < 5.0
    assert "event" not in line


async def test_the_sink_writes_decoded_and_synthetic_events_with_their_names(tmp_path: Path) -> None:
    from stages.synthetic import SyntheticConfig, SyntheticSource

    path = tmp_path / "out.jsonl"
    named = make_batch(ts_ns=[time.monotonic_ns()], pid=[1]).replace(event_name="exec")
    await run_sink(path, [named, make_batch(pid=[2])])
    first, second = whole_lines(path)
    assert list(first) == ["event", "time", "ts_ns", "pid", "weight"]
    assert first["event"] == "exec" and first["time"].endswith("Z")  # type: ignore[union-attr]
    assert list(second) == ["pid", "weight"]

    pipe = Pipeline(
        [
            NodeSpec("source", SyntheticSource, SyntheticConfig(total_events=3, batch_size=3)),
            NodeSpec("out", JsonLinesSink, JsonLinesConfig(path=str(path))),
        ],
        [4],
    )
    await pipe.run()
    lines = whole_lines(path)[2:]
    assert [line["event"] for line in lines] == ["synthetic"] * 3
    for line in lines:
        stamp = datetime.datetime.fromisoformat(str(line["time"])[:26] + "+00:00")
        assert abs(stamp.timestamp() - time.time()) < 5.0  # ts_ns is CLOCK_MONOTONIC, like the kernel's


# -- a stalled reader is back-pressure, not a frozen loop ------------------------------------


@contextlib.contextmanager
def stalled_fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO whose reader never reads (writes block once the pipe buffer is full)."""
    path = tmp_path / "stalled.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    lock = threading.Lock()
    closed = False

    def close_reader() -> None:  # the stuck writer now gets EPIPE: a regression fails, not hangs
        nonlocal closed
        with lock:
            if not closed:
                os.close(reader)
                closed = True

    watchdog = threading.Timer(3.0, close_reader)
    watchdog.start()
    try:
        yield path
    finally:
        watchdog.cancel()
        close_reader()


async def test_a_stalled_reader_does_not_freeze_the_loop_and_cancel_works(tmp_path: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.005)
            ticks += 1

    with stalled_fifo(tmp_path) as fifo:
        big = [make_batch(value=np.arange(20_000), comm=np.full(20_000, b"x" * 15)) for _ in range(4)]
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            with trio.move_on_after(0.5) as scope:
                await run_sink(fifo, big)
            nursery.cancel_scope.cancel()
        elapsed = time.monotonic() - started
    assert scope.cancelled_caught, "the writes should have stalled"
    assert elapsed < 2.0, "cancellation must not wait for the stuck write"
    assert ticks >= 20, f"the loop only ran {ticks} ticks while the sink was stalled"


async def test_a_huge_batch_is_encoded_in_slices_that_let_other_tasks_run() -> None:
    from stages.jsonl_sink import JsonLinesEncoder

    batch = make_batch(value=np.arange(1000))
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await trio.sleep(0)
            turns += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.sleep(0)
        before = turns
        blobs = await JsonLinesEncoder().encode_batch(batch, slice_events=100)
        during = turns - before
        nursery.cancel_scope.cancel()
    assert len(blobs) == 10
    assert during >= 8  # a turn at (nearly) every checkpoint; none without them


def test_the_log_handler_drops_and_counts_instead_of_blocking_then_says_so_once() -> None:
    from pipeline._log import LogfmtFormatter, QueuedStderrHandler

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    output = LineOutput.inherited(write_fd, "pipe", max_queued_bytes=4096)
    handler = QueuedStderrHandler(output, flush_timeout_s=0.5)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("bpfpipe.test_output")
    logger.propagate = False
    logger.addHandler(handler)

    async def flood() -> float:
        started = time.monotonic()
        for i in range(5000):  # ~500 kB: far more than the pipe (64 kB) plus the queue hold
            logger.warning("line %d %s", i, "y" * 60)
        return time.monotonic() - started

    try:
        assert trio.run(flood) < 2.0
        assert handler.dropped_total > 0
        for i in range(10_000):  # the pipe is full by now: the next lines are dropped
            if handler.dropped_lines:
                break
            logger.warning("more %d", i)
        dropped = handler.dropped_lines
        assert dropped > 0
        seen = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not output.wait_idle(0.01):
            with contextlib.suppress(BlockingIOError):
                seen += os.read(read_fd, 1 << 20)
        with contextlib.suppress(BlockingIOError):
            seen += os.read(read_fd, 1 << 20)
        trio.run(lambda: trio.to_thread.run_sync(logger.warning, "after"))
        assert output.wait_idle(2.0)
        seen += os.read(read_fd, 1 << 20)
        tail = seen.decode().splitlines()[-2:]
        assert f"dropped {dropped} log lines" in tail[0] and "after" in tail[1]
        assert handler.dropped_lines == 0 and handler.dropped_total >= dropped
    finally:
        logger.removeHandler(handler)
        output.close_nowait()
        os.close(read_fd)
        os.close(write_fd)


# -- disk full / output gone: whole lines only, a graceful stop -------------------------------


async def test_dev_full_is_output_closed_not_an_error_per_batch() -> None:
    pipe = await run_sink("/dev/full", batches(5, 10))
    books = outcomes(pipe)
    assert books.pop(("delivered", "")) == 0
    assert books.pop(("stage_dropped", "output closed")) >= 10
    assert set(books) <= {("stage_dropped", "stopped before send")}  # the source was asked to stop
    assert pipe.nodes[-1].ctx.stats.errors == 0


async def test_a_closed_pipe_is_output_closed(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    out = LineOutput.inherited(write_fd, "pipe")
    assert not out.inline  # a pipe's reader may stall: never written from the loop
    try:
        with pytest.raises(SinkClosed, match="pipe"):
            await out.write([b"x\n"])
    finally:
        os.close(write_fd)


@pytest.fixture
def short_writes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """os.write in pipeline.output takes at most ``budget`` more bytes, then fails with ENOSPC."""
    state = {"budget": 10**9}
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if state["budget"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[: state["budget"]]))
        state["budget"] -= n
        return n

    monkeypatch.setattr(pipeline.output.os, "write", write)
    return state


@pytest.mark.parametrize("sink_cls", [JsonLinesSink, SpoolSink])
async def test_a_short_write_is_truncated_to_the_last_whole_line(
    tmp_path: Path, short_writes: dict[str, int], sink_cls: type
) -> None:
    path = tmp_path / "out.jsonl"
    line = len(b'{"value":100,"comm":"cat","weight":1.0}\n')
    short_writes["budget"] = 2 * 10 * line + line // 2  # two batches, then half a line of the third
    pipe = await run_sink(path, batches(5, 10), sink_cls)
    assert [e["value"] for e in whole_lines(path)] == list(range(100, 120))
    assert outcomes(pipe) == {("delivered", ""): 20, ("stage_dropped", "output closed"): 30}


def output_threads(path: Path) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"bpfpipe-output {path}"]


async def test_small_appends_to_a_file_are_written_inline_until_some_in_a_row_are_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    out = LineOutput.open(str(path))
    try:
        for i in range(3):
            await out.write([b'{"n":%d}\n' % i])
        assert path.read_bytes() == b'{"n":0}\n{"n":1}\n{"n":2}\n'  # written before write returned
        assert not output_threads(path)  # no thread, so no wake-up of the loop when it is done
        big = b"x" * out.inline_max_bytes + b"\n"
        await out.write([big])  # too big to write inline: the thread takes it
        assert len(output_threads(path)) == 1 and path.read_bytes().endswith(big)

        # The thread is idle again: small writes are inline, until some in a row are slow.
        real_write = os.write
        calls: list[str] = []
        slow = [True, True, False, True, True, True, True]  # one fast write resets the count

        def slow_write(fd: int, data: bytes | memoryview) -> int:
            calls.append(threading.current_thread().name)
            if slow.pop(0):
                time.sleep(2 * out.inline_slow_s)
            return real_write(fd, data)

        monkeypatch.setattr(pipeline.output.os, "write", slow_write)
        assert out.inline_slow_limit == 3
        for n in range(3, 8):
            await out.write([b'{"n":%d}\n' % n])
        assert out.inline
        await out.write([b'{"n":8}\n'])  # the third slow one in a row
        assert not out.inline
        await out.write([b'{"n":9}\n'])
        here, thread = threading.current_thread().name, f"bpfpipe-output {path}"
        assert calls == [here] * 6 + [thread]  # the 4th..6th writes were slow in a row
        assert path.read_bytes().endswith(b"".join(b'{"n":%d}\n' % n for n in range(3, 10)))
    finally:
        await out.aclose()


@pytest.mark.parametrize("inline", [True, False])
async def test_the_page_cache_keeps_only_the_newest_window_of_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    dropped: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append((offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(pipeline.output.os, "posix_fadvise", fadvise)
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"old\n")
    out = LineOutput.open(str(path))
    out.cache_window_bytes = 10_000
    if not inline:
        out.inline_max_bytes = 0
    line = b"y" * 2999 + b"\n"
    try:
        for _ in range(10):
            await out.write([line])
    finally:
        await out.aclose()
    # Every 10 000 bytes more, the file up to where it stood the time before is let go of:
    # at 12 004 bytes up to 4 (where it started), at 24 004 up to 12 004; at 30 004 not yet.
    assert dropped == [(0, 4), (0, 12_004)]
    assert path.read_bytes() == b"old\n" + line * 10  # uncached, not lost


async def test_appending_after_a_torn_line_starts_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"value":1}\n{"val')
    await run_sink(path, batches(1, 2))
    lines = path.read_bytes().splitlines()
    assert lines[:2] == [b'{"value":1}', b'{"val']
    assert [json.loads(x)["value"] for x in lines[2:]] == [100, 101]


@pytest.mark.parametrize("sink_cls", [JsonLinesSink, SpoolSink])
async def test_a_full_tmpfs_holds_exactly_the_delivered_lines(tmp_path: Path, sink_cls: type) -> None:
    with mounted_tmpfs(tmp_path / "mnt") as mnt:
        path = mnt / "out.jsonl"
        pipe = await run_sink(path, batches(200, 50), sink_cls)  # ~400 kB into 64 kB
        on_disk = whole_lines(path)
        books = outcomes(pipe)
        assert books[("delivered", "")] == len(on_disk) > 0
        assert books[("stage_dropped", "output closed")] >= 50  # then the source was stopped
        assert [e["value"] for e in on_disk] == list(range(100, 100 + len(on_disk)))
        # Room again: a later run appends whole lines after ours.
        (path.parent / "hole").unlink(missing_ok=True)
        os.truncate(path, len(b"".join(path.read_bytes().splitlines(keepends=True)[:-5])))
        again = await run_sink(path, batches(1, 3), sink_cls)
        assert outcomes(again)[("delivered", "")] == 3
        assert [e["value"] for e in whole_lines(path)][-3:] == [100, 101, 102]


# -- an output that cannot be opened fails at build time ----------------------------------


def sink_config(tmp_path: Path, use: str, path: Path) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(f'[source]\nuse = "synthetic"\n[sink]\nuse = "{use}"\n[sink.config]\npath = "{path}"\n')
    return config


@pytest.mark.parametrize("use", ["jsonl", "spool"])
@pytest.mark.parametrize(
    ("where", "problem"),
    [("a directory", "is a directory"), ("a file under a file", "not a directory"), ("missing dir", "")],
)
def test_an_unwritable_path_is_a_config_error(tmp_path: Path, use: str, where: str, problem: str) -> None:
    from pipeline import build_pipeline

    target = {
        "a directory": tmp_path,
        "a file under a file": tmp_path / "c.toml" / "out.jsonl",
        "missing dir": tmp_path / "nope" / "out.jsonl",
    }[where]
    config = load_config(str(sink_config(tmp_path, use, target)))
    if where == "missing dir" and use == "spool":  # the spool creates its directories
        build_pipeline(config)
        assert not target.parent.exists(), "checking must not create anything"
        return
    with pytest.raises(
        ConfigError, match=r"sink\.config\.path: cannot write: .*" + (problem or "does not exist")
    ):
        build_pipeline(config)


def test_a_read_only_path_is_a_config_error(tmp_path: Path) -> None:
    from pipeline import build_pipeline

    if os.geteuid() == 0:
        with mounted_tmpfs(tmp_path / "mnt", "size=16k,ro") as mnt:
            config = load_config(str(sink_config(tmp_path, "jsonl", mnt / "out.jsonl")))
            with pytest.raises(ConfigError, match=r"cannot write: directory .* is not writable"):
                build_pipeline(config)
        return
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    config = load_config(str(sink_config(tmp_path, "jsonl", ro / "out.jsonl")))
    with pytest.raises(ConfigError, match=r"cannot write: directory .* is not writable"):
        build_pipeline(config)


def test_stdout_needs_no_check() -> None:
    assert JsonLinesSink.resolve_config(JsonLinesConfig(path="-"), load_config(None)) == JsonLinesConfig()


def test_a_line_output_on_a_fresh_file_counts_its_bytes(tmp_path: Path) -> None:
    async def main() -> LineOutput:
        out = LineOutput.open(str(tmp_path / "a" / "b.jsonl"), create_parents=True)
        await out.write([b"1\n", b"22\n"])
        await out.aclose()
        return out

    out = trio.run(main)
    assert out.size_bytes == 5 == (tmp_path / "a" / "b.jsonl").stat().st_size


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.uint32, np.int32])
def test_few_times_are_formatted_as_the_vectorised_path_does(dtype: type) -> None:
    """Up to ``_FEW_TIMES`` timestamps are formatted in a Python loop: same strings, same ``None``s."""
    from stages.jsonl_sink import _FEW_TIMES, _INT64_MAX, _rfc3339_vectorised, rfc3339_times

    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    edges = [int(info.min), int(info.max), 0, 1, max(int(info.min), -1)]
    offsets = [1_764_700_000_000_000_000, 0, -1_764_700_000_000_000_000, _INT64_MAX, -_INT64_MAX - 1]
    for _ in range(500):
        n = int(rng.integers(1, _FEW_TIMES + 1))
        values = [
            edges[int(rng.integers(len(edges)))]
            if rng.random() < 0.3
            else int(rng.integers(info.min, info.max, dtype=dtype, endpoint=True))
            for _ in range(n)
        ]
        ts = np.array(values, dtype=dtype)
        for offset in [*offsets, int(rng.integers(-(1 << 63), (1 << 63) - 1))]:
            assert rfc3339_times(ts, offset) == _rfc3339_vectorised(ts, offset)
    # A real batch: sorted stamps a few ms apart, some crossing a second (the prefix is reused;
    # for the 32-bit dtypes the cast wraps them, which still compares the two paths).
    for _ in range(200):
        n = int(rng.integers(1, _FEW_TIMES + 1))
        base = int(rng.integers(0, min(int(info.max), 10**12)))
        ts = np.sort(rng.integers(0, 3 * 10**9, n) // 10**6 * 10**6 + base).astype(dtype)
        offset = 1_764_700_000_000_000_000 - int(rng.integers(0, 10**9))
        assert rfc3339_times(ts, offset) == _rfc3339_vectorised(ts, offset)
