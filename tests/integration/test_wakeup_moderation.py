"""Wake-up moderation on the real kernel: bpfpipe.h's side and the reader's.

The kernel submits with BPF_RB_NO_WAKEUP until ``bpfpipe_wakeup``'s pending
bytes reach the threshold the reader set; the reader reads at the latest
``max_batch_delay_ms`` after its last read. Driven by the ``loadgen`` program
(K events per ``getppid()`` call of this process). Margins are loose: these
tests check behaviour, never speed.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import trio

from bpf.loader import LoadgenProgram, load_program
from bpf.ringbuf import RingBuffer
from pipeline import Batch, NodeSpec, Outcome, Pipeline
from pipeline.testing import TestingSink
from stages.decoder import Decoder
from stages.reader import RingBufferReader, RingBufferReaderConfig

pytestmark = pytest.mark.bpf

RECORD_BYTES = 40  # struct loadgen_event (32 bytes) and the ring's 8-byte header


@pytest.fixture
def loadgen() -> Iterator[LoadgenProgram]:
    program = load_program("loadgen", ring_buffer_size=1 << 16, map_size=1024)
    assert isinstance(program, LoadgenProgram)
    with program:
        program.configure_loadgen(os.getpid(), 1)
        yield program


def test_kernel_wakes_only_when_the_threshold_is_crossed(loadgen: LoadgenProgram) -> None:
    wakeup = loadgen.ring_wakeup
    assert wakeup is not None and wakeup.threshold_bytes == 0  # off until a reader sets it
    with RingBuffer(loadgen.ring_map_fd, loadgen.ring_size_bytes) as ring, select.epoll() as edges:
        edges.register(ring.fileno(), select.EPOLLIN | select.EPOLLET)
        os.getppid()
        assert edges.poll(0)  # threshold 0: the kernel's default wake-up
        assert ring.read_batch().records == 1

        wakeup.set_threshold(10 * RECORD_BYTES)
        wakeup.reset_pending()
        for _ in range(9):
            os.getppid()
        assert not edges.poll(0)  # below the threshold: no wake-up
        assert wakeup.pending_bytes == ring.unconsumed_bytes() == 9 * RECORD_BYTES
        os.getppid()
        assert edges.poll(0)  # the 10th record crosses it
        for _ in range(20):
            os.getppid()
        assert not edges.poll(0)  # once per crossing, until the reader resets
        wakeup.reset_pending()
        assert ring.read_batch().records == 30
    stats = loadgen.kernel_stats()
    assert stats["events"] == stats["emitted"] == 31  # counting is untouched


class StampingSink(TestingSink):
    """Keeps every batch and the CLOCK_MONOTONIC time (bpf_ktime_get_ns's clock) it arrived."""

    def __init__(self, config: Any, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.arrived_ns: list[int] = []

    async def write(self, batch: Batch) -> None:
        self.arrived_ns += [time.clock_gettime_ns(time.CLOCK_MONOTONIC)] * len(batch)
        await super().write(batch)


def loadgen_pipeline(**config: Any) -> Pipeline:
    # Counter reads and idle polls far apart: only the latency budget and the
    # kernel's wake-ups make the reader read.
    reader_config = RingBufferReaderConfig(
        program="loadgen", ring_buffer_size=1 << 16, idle_poll_s=30.0, stats_interval_s=30.0, **config
    )
    return Pipeline(
        [
            NodeSpec("reader", RingBufferReader, reader_config),
            NodeSpec("decoder", Decoder),
            NodeSpec("sink", StampingSink),
        ],
        [4, 4],
    )


async def produce(
    pipe: Pipeline, calls: int, per_call: int, spacing_s: float, *, before: int = 0
) -> RingBufferReader:
    """``calls`` getppid() calls of ``per_call`` events each, ``spacing_s`` apart; then
    wait until ``before`` + all of them were delivered."""
    reader = pipe.nodes[0]
    assert isinstance(reader, RingBufferReader)
    program = reader.program
    assert isinstance(program, LoadgenProgram)
    program.configure_loadgen(os.getpid(), per_call)
    for _ in range(calls):
        os.getppid()
        if spacing_s:
            await trio.sleep(spacing_s)
    with trio.fail_after(10):
        while pipe.ledger.snapshot().total(Outcome.DELIVERED) < before + calls * per_call:
            await trio.sleep(0.005)
    return reader


def assert_balanced(pipe: Pipeline, reader: RingBufferReader, total: int) -> None:
    kernel = reader.statistics().kernel
    snap = pipe.ledger.snapshot()
    assert kernel.events == kernel.emitted == total
    assert snap.produced == snap.total(Outcome.DELIVERED) == total and snap.pending == 0
    pipe.ledger.check_conserved()


async def test_a_trickle_is_read_within_the_budget_with_few_wakeups() -> None:
    budget_ms, events = 100.0, 50
    pipe = loadgen_pipeline(max_batch_delay_ms=budget_ms)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        reader = await produce(pipe, events, 1, spacing_s=0.005)
        stats = reader.statistics()
        pipe.stop()
    assert stats.wakeup_threshold_bytes == (1 << 16) // 2
    # 2,000 bytes in all never reach the 32 KiB threshold: the kernel never woke the
    # reader (with its default wake-ups: once per read at least, and before this
    # reader, once per event); the latency budget alone made it read.
    assert stats.wakeups == 0
    assert stats.batches < events / 4
    sink = pipe.nodes[-1]
    assert isinstance(sink, StampingSink)
    sent_ns = np.concatenate([b.events["ts_ns"] for b in sink.batches]).astype(np.int64)
    latency_ms = (np.array(sink.arrived_ns, dtype=np.int64) - sent_ns) / 1e6
    assert len(latency_ms) == events
    assert latency_ms.min() >= 0
    assert latency_ms.max() < budget_ms + 400  # loose: the budget, plus scheduling on a busy host
    assert_balanced(pipe, reader, events)


async def test_a_burst_past_the_threshold_wakes_a_lingering_reader() -> None:
    per_call, calls = 64, 16  # 1024 records, 40 KiB: past the 32 KiB threshold of a 64 KiB ring
    pipe = loadgen_pipeline(max_batch_delay_ms=30_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        # One event first: the reader leaves it in the ring for up to the 30 s budget.
        # With the kernel's default wake-ups nothing would wake it again before then
        # (they wake only a reader that has caught up).
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader) and isinstance(reader.program, LoadgenProgram)
        reader.program.configure_loadgen(os.getpid(), 1)
        os.getppid()
        await trio.sleep(0.05)
        assert pipe.ledger.snapshot().total(Outcome.DELIVERED) == 0
        reader = await produce(pipe, calls, per_call, spacing_s=0, before=1)  # fails after 10 s
        stats = reader.statistics()
        pipe.stop()
    assert stats.wakeups >= 1
    assert_balanced(pipe, reader, 1 + calls * per_call)


async def test_watermark_zero_wakes_the_reader_for_every_event() -> None:
    events = 20
    pipe = loadgen_pipeline(wakeup_watermark=0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        reader = await produce(pipe, events, 1, spacing_s=0.005)
        stats = reader.statistics()
        pipe.stop()
    assert stats.wakeup_threshold_bytes == 0
    assert stats.wakeups >= events / 2  # (a few may land while it is busy sending)
    assert_balanced(pipe, reader, events)


async def test_while_the_gate_samples_the_reader_wakes_at_the_sampling_watermark() -> None:
    ring = 1 << 16
    pipe = loadgen_pipeline(max_batch_delay_ms=20.0, wakeup_watermark=0.5, sampling_wakeup_watermark=0.125)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader) and isinstance(reader.program, LoadgenProgram)
        wakeup = reader.program.ring_wakeup
        assert wakeup is not None and wakeup.threshold_bytes == ring // 2
        reader.program.set_sample_rate(4)  # as the sampler does when it sheds load
        # 400 events, about 100 kept; the next read after the change takes the sampling watermark.
        reader.program.configure_loadgen(os.getpid(), 4)
        for _ in range(100):
            os.getppid()
        with trio.fail_after(10):
            while wakeup.threshold_bytes != ring // 8:
                await trio.sleep(0.005)
        assert reader.statistics().wakeup_threshold_bytes == ring // 8
        reader.program.set_sample_rate(1)
        with trio.fail_after(10):
            while wakeup.threshold_bytes != ring // 2:
                await trio.sleep(0.005)
        assert reader.statistics().wakeup_threshold_bytes == ring // 2
        pipe.stop()
    kernel = reader.statistics().kernel
    assert kernel.events == 400 == kernel.emitted + kernel.sampled_out and kernel.sampled_out > 0
    snap = pipe.ledger.snapshot()
    assert snap.pending == 0 and snap.total(Outcome.DELIVERED) == kernel.emitted


async def test_a_wake_up_is_read_at_once_even_below_the_threshold() -> None:
    # The kernel counts bytes since the reader's last reset, and that count includes records
    # the last read took (they arrived between the reset and the read), so it can cross the
    # threshold while the ring holds less. It then wakes the reader once and no more until
    # the next reset: a reader that lingered until its budget lost events at 100 k/s.
    pipe = loadgen_pipeline(max_batch_delay_ms=30_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader) and isinstance(reader.program, LoadgenProgram)
        wakeup = reader.program.ring_wakeup
        assert wakeup is not None and wakeup.threshold_bytes == (1 << 16) // 2
        reader.program.configure_loadgen(os.getpid(), 1)
        for _ in range(100):  # 4,000 bytes: far below the threshold, so they wait
            os.getppid()
        await trio.sleep(0.05)
        assert pipe.ledger.snapshot().total(Outcome.DELIVERED) == 0
        # That state, made directly: the count one record short of the threshold.
        wakeup._view()[wakeup._pending] = wakeup.threshold_bytes - RECORD_BYTES
        os.getppid()  # crosses it: the kernel wakes the reader, 4,040 bytes in the ring
        with trio.fail_after(5):
            while pipe.ledger.snapshot().total(Outcome.DELIVERED) < 101:
                await trio.sleep(0.005)
        stats = reader.statistics()
        pipe.stop()
    assert stats.wakeups >= 1
    assert_balanced(pipe, reader, 101)
