"""RingBufferReader accounting, without a kernel.

``FakeProgram`` (``tests/_ring_doubles.py``) plays the BPF side with the kernel's
rules: it counts every event, passes it through a sampling gate, reserves space
in a :class:`~bpf.ringbuf.SimulatedRing` (counting a lost reservation when full),
counts ``emitted`` *before* committing, and can be caught mid-run (an event
counted, its record still BUSY). The reader runs in a real pipeline; every test
ends with the ledger balancing exactly.
"""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
import trio
from _ring_doubles import RECORD_BYTES, FakeProgram, reader_for
from hypothesis import given
from hypothesis import strategies as st

from pipeline import (
    Batch,
    BatchSender,
    BatchSink,
    InflightBudget,
    Ledger,
    NodeSpec,
    Outcome,
    Pipeline,
    StageContext,
)
from pipeline.ring_accounting import KernelCounters, LedgerStep, RingAccountant
from pipeline.testing import TestingSink, wait_until
from stages.decoder import Decoder
from stages.reader import RingBufferReader, RingBufferReaderConfig


class UndetachableProgram(FakeProgram):
    """A loader without ``detach()`` whose counters vanish with ``close()``."""

    detach = None  # type: ignore[assignment]

    def kernel_stats(self) -> dict[str, int]:
        if self.closed:
            raise OSError("bad file descriptor")
        return super().kernel_stats()


def config(**overrides: Any) -> RingBufferReaderConfig:
    base: dict[str, Any] = {"program": "fake", "idle_poll_s": 0.02, "stats_interval_s": 0.02}
    base.update(overrides)
    return RingBufferReaderConfig(**base)


def build(program: FakeProgram, *, sink: type = TestingSink, capacity: int = 4, **cfg: Any) -> Pipeline:
    specs = [
        NodeSpec("reader", reader_for(program), config(**cfg)),
        NodeSpec("decoder", Decoder),
        NodeSpec("sink", sink),
    ]
    return Pipeline(specs, [capacity, capacity])


def delivered(pipe: Pipeline) -> int:
    return pipe.ledger.snapshot().total(Outcome.DELIVERED)


def seqs(pipe: Pipeline) -> list[int]:
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    return [int(s) for b in sink.batches for s in b.events["seq"]]


def assert_balanced(pipe: Pipeline, program: FakeProgram) -> None:
    snap = pipe.ledger.snapshot()
    assert snap.produced == program.events
    assert snap.total(Outcome.KERNEL_SAMPLED_OUT) == program.sampled_out
    assert snap.total(Outcome.LOST_ON_RESERVE) == program.lost_reserve
    assert snap.pending == 0
    pipe.ledger.check_conserved()
    reader = pipe.statistics().stage("reader")
    assert reader.held_events == 0  # nothing left for the runtime to call "unreported"
    assert not any(k.reason == "unreported" for k in snap.outcomes)


async def test_every_event_read_in_order_and_the_ledger_balances():
    program = FakeProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        for round_ in range(5):  # more than the ring holds, in rounds
            program.fire(300)
            await wait_until(lambda r=round_: delivered(pipe) == 300 * (r + 1))
        pipe.stop()
    assert seqs(pipe) == list(range(1500))
    assert_balanced(pipe, program)
    reader = pipe.nodes[0]
    assert isinstance(reader, RingBufferReader)
    assert reader.statistics().records_read == 1500
    assert program.closed and not program.attached


async def test_sampled_and_lost_events_get_their_outcomes_and_weights():
    program = FakeProgram(ring_size=1 << 12)  # 127 records fit
    program.rate = 4
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(2000)  # no checkpoint: the reader cannot drain meanwhile
        await wait_until(lambda: delivered(pipe) == program.emitted)
        pipe.stop()
    assert program.sampled_out > 1000 and program.lost_reserve > 0
    assert_balanced(pipe, program)
    snap = pipe.ledger.snapshot()
    assert snap.total(Outcome.DELIVERED) == program.emitted
    assert snap.total_weight(Outcome.DELIVERED) == 4.0 * program.emitted
    assert snap.total_weight(Outcome.KERNEL_SAMPLED_OUT) == 0.0
    assert snap.total_weight(Outcome.LOST_ON_RESERVE) == 4.0 * program.lost_reserve


async def test_produced_is_credited_before_the_counters_are_read():
    program = FakeProgram()
    pipe = build(program, stats_interval_s=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(100)
        await wait_until(lambda: delivered(pipe) == 100)
        snap = pipe.ledger.snapshot()
        assert snap.produced == 100 and snap.pending == 0  # credited from the records read
        pipe.stop()
    assert_balanced(pipe, program)


async def test_shutdown_reads_what_is_left_in_the_ring():
    program = FakeProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(200)
        pipe.stop()  # before the reader had a chance to run
    assert seqs(pipe) == list(range(200))
    assert_balanced(pipe, program)


async def test_shutdown_waits_for_a_program_run_in_flight():
    program = FakeProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(10)
        await wait_until(lambda: delivered(pipe) == 10)
        pos = program.begin()  # counted, record BUSY: a run on another CPU
        program.fire(5)  # committed behind the BUSY record

        async def finish_later() -> None:
            await trio.sleep(0.05)
            program.finish(pos)

        nursery.start_soon(finish_later)
        pipe.stop()
    assert seqs(pipe) == list(range(16))
    assert_balanced(pipe, program)


async def test_shutdown_deadline_abandons_what_never_became_readable():
    program = FakeProgram()
    pipe = build(program, shutdown_timeout_s=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(10)
        await wait_until(lambda: delivered(pipe) == 10)
        program.begin()  # never finishes
        program.fire(5)
        pipe.stop()
    snap = pipe.ledger.snapshot()
    drained = {k.reason: t.count for k, t in snap.outcomes.items() if k.outcome is Outcome.DRAINED}
    assert drained == {"shutdown: unreadable": 6}
    assert snap.total(Outcome.DELIVERED) == 10
    assert_balanced(pipe, program)


class StuckSink(BatchSink):
    async def write(self, batch: Batch) -> None:
        await trio.sleep_forever()


async def test_records_downstream_cannot_take_at_shutdown_are_drained():
    program = FakeProgram()
    pipe = build(program, sink=StuckSink, capacity=1, max_batch_records=10, shutdown_timeout_s=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(100)
        await wait_until(lambda: pipe.statistics().stage("reader").sent_events >= 40)
        await trio.sleep(0.05)  # the reader is now blocked sending
        pipe.stop()
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        await wait_until(lambda: reader.program is not None and program.closed)
        pipe.abort()
    snap = pipe.ledger.snapshot()
    drained = sum(t.count for k, t in snap.outcomes.items() if k.outcome is Outcome.DRAINED)
    sent = pipe.statistics().stage("reader").sent_events
    assert drained > 0 and drained + sent == 100
    assert_balanced(pipe, program)


async def test_without_detach_or_counters_after_close_it_still_balances():
    program = UndetachableProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(50)
        await wait_until(lambda: delivered(pipe) == 50)
        await trio.sleep(0.05)  # let a counter read happen
        program.fire(20)  # only the records tell us about these
        pipe.stop()
    assert seqs(pipe) == list(range(70))
    assert_balanced(pipe, program)


async def test_drain_oldest_skips_and_records_drained():
    program = FakeProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        program.fire(50)
        assert reader.drain_oldest(max_records=20) == 20  # no checkpoint since fire()
        await wait_until(lambda: delivered(pipe) == 30)
        pipe.stop()
    assert seqs(pipe) == list(range(20, 50))
    snap = pipe.ledger.snapshot()
    [(key, tally)] = [(k, t) for k, t in snap.outcomes.items() if k.outcome is Outcome.DRAINED]
    assert (key.reason, tally.count) == ("ring full", 20)
    assert reader.statistics().records_drained == 20
    assert_balanced(pipe, program)


async def test_wakes_on_data_not_on_the_idle_timeout():
    program = FakeProgram()
    pipe = build(program, idle_poll_s=30.0, stats_interval_s=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.05)  # the reader is now asleep in wait_readable
        start = trio.current_time()
        program.fire(10)
        await wait_until(lambda: delivered(pipe) == 10, timeout=2.0)
        assert trio.current_time() - start < 1.0
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        stats = reader.statistics()
        assert stats.wakeups >= 1 and stats.idle_timeouts == 0
        pipe.stop()
    assert_balanced(pipe, program)


async def test_batches_respect_max_records_and_usage_is_reported():
    program = FakeProgram(ring_size=1 << 14)
    pipe = build(program, max_batch_records=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(50)
        await wait_until(lambda: delivered(pipe) == 50)
        pipe.stop()
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    assert max(len(b) for b in sink.batches) == 7
    assert seqs(pipe) == list(range(50))
    reader = pipe.nodes[0]
    assert isinstance(reader, RingBufferReader)
    assert reader.peak_ring_usage == pytest.approx(50 * RECORD_BYTES / (1 << 14))
    assert 0.0 <= reader.ring_usage <= reader.peak_ring_usage  # fill level at the last wake-up
    assert reader.statistics().ring_size_bytes == 1 << 14
    assert_balanced(pipe, program)


async def test_stop_while_loading_closes_the_loaded_program():
    program = FakeProgram()

    class SlowReader(reader_for(program)):
        def load_program(self) -> Any:
            time.sleep(0.1)  # compiling, in the worker thread
            return program

    reader = SlowReader(config(), StageContext("reader", "source", Ledger(), InflightBudget()))
    with trio.move_on_after(0.02):
        await reader.run(cast(BatchSender, None))
    assert program.closed


# -- the pure accountant -------------------------------------------------------------------


def test_accountant_arithmetic():
    acc = RingAccountant()
    assert acc.took(3) == 3  # records read before any counters: credited
    step = acc.observe(KernelCounters(events=10, sampled_out=4, lost_reserve=1, emitted=5))
    assert step == LedgerStep(produced=7, sampled_out=4, lost_reserve=1)
    assert acc.readable_backlog == 2 and acc.unresolved == 2
    assert acc.took(2) == 0  # already counted by the kernel
    assert acc.unresolved == 0
    with pytest.raises(ValueError, match="backwards"):
        acc.observe(KernelCounters(events=9, sampled_out=4, lost_reserve=1, emitted=5))
    with pytest.raises(ValueError, match="lacks emitted"):
        KernelCounters.from_stats({"events": 1, "sampled_out": 0, "lost_reserve": 0})


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("run"), st.sampled_from(["sampled", "lost", "emit", "emit", "start"])),
            st.tuples(st.just("finish"), st.sampled_from(["sampled", "lost", "emit"])),
            st.tuples(st.just("consume"), st.integers(0, 5)),
            st.tuples(st.just("observe"), st.just("")),
        ),
        max_size=120,
    )
)
def test_accountant_never_over_or_under_reports(ops):
    """Against a kernel model: produced never exceeds the true event count, never
    lags what was taken from the ring, and is exact once everything settled."""
    acc = RingAccountant()
    true = {"events": 0, "sampled_out": 0, "lost_reserve": 0, "emitted": 0}
    in_ring = in_flight = 0
    fate_key = {"sampled": "sampled_out", "lost": "lost_reserve", "emit": "emitted"}
    reported = 0

    def check() -> None:
        assert acc.produced == reported
        assert acc.produced <= true["events"]
        assert acc.unresolved >= 0

    for op, arg in ops:
        if op == "run":
            true["events"] += 1
            if arg == "start":
                in_flight += 1
            else:
                true[fate_key[arg]] += 1
                in_ring += arg == "emit"
        elif op == "finish" and in_flight:
            in_flight -= 1
            true[fate_key[arg]] += 1
            in_ring += arg == "emit"
        elif op == "consume":
            n = min(arg, in_ring)
            in_ring -= n
            reported += acc.took(n)
        elif op == "observe":
            reported += acc.observe(KernelCounters(**true)).produced
        check()
    while in_flight:
        in_flight -= 1
        true["emitted"] += 1
        in_ring += 1
    reported += acc.took(in_ring)
    reported += acc.observe(KernelCounters(**true)).produced
    check()
    assert acc.produced == true["events"]
    assert acc.unresolved == 0


class CountingProgram(FakeProgram):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats_reads = 0

    def kernel_stats(self) -> dict[str, int]:
        self.stats_reads += 1
        return super().kernel_stats()


async def test_counters_are_read_often_only_while_the_ring_may_lose_or_the_gate_samples():
    """Every ``stats_interval_s`` while a read found the ring half full (a reservation may
    have failed) or the gate samples; otherwise once a second: the records read are
    credited as they are sent, so reading the counters would change nothing."""
    program = CountingProgram(ring_size=1 << 12)  # 128 records
    pipe = build(program, stats_interval_s=0.02, idle_poll_s=0.02, max_batch_delay_ms=20)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(1.1)  # past the first idle read of the counters
        reads = program.stats_reads
        for _ in range(10):  # a trickle: the ring never gets near full
            program.fire(3)
            await trio.sleep(0.04)
        assert delivered(pipe) == 30
        assert program.stats_reads - reads <= 1  # 0.4 s: one idle read at most, not 20
        # Overflow it: the next reads find it full, and the losses are counted at once.
        program.fire(400)
        with trio.fail_after(0.2):  # well within the idle interval (1 s)
            await wait_until(
                lambda: pipe.ledger.snapshot().total(Outcome.LOST_ON_RESERVE) == program.lost_reserve > 0
            )
        # The gate samples: the sampled-out events are counted at once too.
        program.rate = 4
        program.gate_rate = 4  # type: ignore[attr-defined]  # what the loader caches
        reads = program.stats_reads
        for _ in range(10):
            program.fire(8)
            await trio.sleep(0.04)
        assert program.stats_reads - reads >= 5
        pipe.stop()
    assert_balanced(pipe, program)


async def test_reader_wakes_for_counter_reads_only_when_one_is_due():
    """With a 1 s budget and a 20 ms counter interval, a quiet ring costs a wake-up per
    budget and per idle counter read, not one per stats tick."""
    program = CountingProgram()
    pipe = build(program, stats_interval_s=0.02, idle_poll_s=5.0, max_batch_delay_ms=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(3)
        await trio.sleep(2.5)
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        timeouts = reader.statistics().idle_timeouts
        assert delivered(pipe) == 3
        pipe.stop()
    assert timeouts <= 8  # ~2.5 budget ends + ~2.5 idle counter reads; 125 stats ticks passed
    assert program.stats_reads <= 5
    assert_balanced(pipe, program)


async def test_reader_under_a_virtual_clock_waits_with_trio_deadlines(autojump_clock):
    """A test's MockClock: no timerfd (the kernel's clock would not follow it)."""
    program = FakeProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        for round_ in range(3):
            program.fire(50)
            await trio.sleep(1.0)  # virtual: the reader's deadlines end its waits
            assert delivered(pipe) == 50 * (round_ + 1)
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        assert reader.statistics().idle_timeouts > 0
        pipe.stop()
    assert_balanced(pipe, program)


async def test_reader_without_a_timerfd_falls_back_to_trio_deadlines(monkeypatch, caplog):
    import stages.reader

    def no_timerfd() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(stages.reader, "MonotonicTimer", no_timerfd)
    program = FakeProgram()
    pipe = build(program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        program.fire(100)
        await wait_until(lambda: delivered(pipe) == 100)
        pipe.stop()
    assert_balanced(pipe, program)
    assert "no timerfd for the reader's waits" in caplog.text
