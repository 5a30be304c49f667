"""The reader's overflow policy, without a kernel.

A fake BPF program (``tests/_ring_doubles.py``) writes into a
:class:`~bpf.ringbuf.SimulatedRing` with the kernel's rules (every event counted,
a reservation that does not fit counted as ``lost_reserve``, ``emitted`` counted
before commit). Each event's ``seq`` is its index among *all* events the program
saw, so the delivered ``seq`` values show exactly which events were lost: the
oldest (``drain_oldest``) or the newest (``block``). Downstream is blocked by a
sink that waits on a valve, behind capacity-1 channels. Every test ends with the
ledger balancing exactly. The policy itself (when, how much) is tested on its own
in ``test_drain_policy.py``; here, the reader acting on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import trio
from _ring_doubles import RECORD_BYTES, FakeProgram, reader_for

from pipeline import Batch, BatchSink, NodeSpec, Outcome, Pipeline, StageContext
from pipeline.testing import settings, wait_until
from stages.decoder import Decoder
from stages.reader import RingBufferReader, RingBufferReaderConfig

RING_BYTES = 1 << 14  # 512 record slots
BATCH_RECORDS = 10


class Valve:
    """Closed: the sink waits before writing. Opened and closed by the test."""

    def __init__(self) -> None:
        self._opened = trio.Event()

    def open(self) -> None:
        self._opened.set()

    def close(self) -> None:
        if self._opened.is_set():
            self._opened = trio.Event()

    async def wait(self) -> None:
        await self._opened.wait()


@dataclass(frozen=True)
class ValveConfig:
    valve: Valve


class ValvedSink(BatchSink):
    """Takes one batch, then writes it (and each next one) only while the valve is open."""

    Config = ValveConfig
    config: ValveConfig

    def __init__(self, config: ValveConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.seqs: list[int] = []

    async def write(self, batch: Batch) -> None:
        await self.config.valve.wait()
        self.seqs += batch.events["seq"].tolist()


@dataclass
class Rig:
    program: FakeProgram
    pipe: Pipeline
    valve: Valve

    @property
    def reader(self) -> RingBufferReader:
        reader = self.pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        return reader

    @property
    def sink(self) -> ValvedSink:
        sink = self.pipe.nodes[-1]
        assert isinstance(sink, ValvedSink)
        return sink

    def drained(self, reason: str) -> int:
        snap = self.pipe.ledger.snapshot()
        return sum(
            t.count for k, t in snap.outcomes.items() if k.outcome is Outcome.DRAINED and k.reason == reason
        )

    def delivered(self) -> int:
        return self.pipe.ledger.snapshot().total(Outcome.DELIVERED)


def rig(*, capacity: int = 1, max_inflight_events: int = 0, **overrides: Any) -> Rig:
    program = FakeProgram(RING_BYTES)
    cfg: dict[str, Any] = {
        "program": "fake",
        "idle_poll_s": 0.02,
        "stats_interval_s": 0.02,
        "max_batch_records": BATCH_RECORDS,
        "drain_high_watermark": 0.9,
        "drain_low_watermark": 0.5,
        "drain_check_s": 0.002,
        "shutdown_timeout_s": 0.5,
    }
    cfg.update(overrides)
    valve = Valve()
    specs = [
        NodeSpec("reader", reader_for(program), RingBufferReaderConfig(**cfg)),
        NodeSpec("decoder", Decoder),
        NodeSpec("sink", ValvedSink, ValveConfig(valve)),
    ]
    # No memory limit: this process's real RSS must not decide when the reader drains
    # (the tests set ``pipe.pressure.memory`` themselves).
    limits = {"max_inflight_events": max_inflight_events, "max_inflight_bytes": 0, "max_memory_mb": 0}
    pipe = Pipeline(specs, [capacity, capacity], settings=settings(limits=limits))
    return Rig(program, pipe, valve)


HELD_DOWNSTREAM = 5 * BATCH_RECORDS
"""Records read before the reader blocks: one batch each in the sink's hands, the
two capacity-1 channels, the decoder's hands and the reader's unsent batch."""


async def block_downstream(r: Rig) -> None:
    """With the valve closed and the ring empty, fill everything downstream of the
    reader and as much again in the ring; returns once the reader is blocked."""
    assert r.program.ring.unconsumed_bytes() == 0
    read_before = r.reader.statistics().records_read
    r.program.fire(2 * HELD_DOWNSTREAM)
    await wait_until(lambda: r.reader.statistics().records_read >= read_before + HELD_DOWNSTREAM)
    await trio.sleep(0.05)  # many drain checks: it stays blocked, nothing more is read
    assert r.reader.statistics().records_read == read_before + HELD_DOWNSTREAM
    assert r.program.ring.unconsumed_bytes() == HELD_DOWNSTREAM * RECORD_BYTES


def assert_balanced(r: Rig) -> None:
    snap = r.pipe.ledger.snapshot()
    assert snap.produced == r.program.events
    assert snap.total(Outcome.LOST_ON_RESERVE) == r.program.lost_reserve == r.program.ring.lost_reserve
    assert snap.total(Outcome.DELIVERED) == len(r.sink.seqs)
    assert snap.pending == 0
    r.pipe.ledger.check_conserved()
    assert r.pipe.budget.events == 0
    assert not any(k.reason in ("unreported", "shutdown") for k in snap.outcomes)


def drain_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        rec
        for rec in caplog.records
        if rec.levelno == logging.WARNING and "draining oldest ring-buffer records" in rec.getMessage()
    ]


# -- drain_oldest --------------------------------------------------------------------------


async def test_past_the_high_watermark_the_oldest_records_are_drained_to_the_low_watermark(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        await block_downstream(r)  # seq 0-49 read, 50-99 waiting in the ring
        assert r.drained("ring full") == 0  # 10 % full: below the high watermark

        r.program.fire(390)  # 440 records: 86 % full, still below it
        await trio.sleep(0.05)
        assert r.drained("ring full") == 0

        r.program.fire(50)  # 490 records: 95.7 % full
        await wait_until(lambda: r.drained("ring full") > 0)
        # Down to the low watermark: (490 - 256) records of 32 bytes leave 8 KiB of 16.
        assert r.drained("ring full") == 234
        assert r.program.ring.usage() == 0.5
        assert r.reader.statistics().records_drained == 234
        await trio.sleep(0.05)  # below the high watermark again: no more draining
        assert r.drained("ring full") == 234

        r.valve.open()
        await wait_until(lambda: r.delivered() == 540 - 234)
        r.pipe.stop()

    # What was read before the drain, then only records newer than every drained one.
    assert r.sink.seqs == list(range(HELD_DOWNSTREAM)) + list(range(HELD_DOWNSTREAM + 234, 540))
    assert r.program.lost_reserve == 0
    assert_balanced(r)
    assert len(drain_warnings(caplog)) == 1


async def test_each_overload_episode_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    r = rig()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        for episode in (1, 2):
            await block_downstream(r)
            for _ in range(5):  # drained again and again while it lasts: one warning
                r.program.fire(220)
                await wait_until(lambda: r.program.ring.usage() < 0.9)
            assert len(drain_warnings(caplog)) == episode
            r.valve.open()  # downstream recovers and the reader catches up
            await wait_until(lambda: r.delivered() == r.program.emitted - r.drained("ring full"))
            r.valve.close()
        r.pipe.stop()
    assert len(drain_warnings(caplog)) == 2
    assert_balanced(r)


@pytest.mark.parametrize("overflow", ["drain_oldest", "block"])
async def test_under_sustained_overload_drain_keeps_the_newest_and_block_the_oldest(overflow: str) -> None:
    r = rig(overflow=overflow)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        await block_downstream(r)
        for _ in range(30):  # 1200 events while downstream takes nothing
            r.program.fire(40)  # under the headroom above the high watermark (51 records)
            await trio.sleep(0.01)
        r.valve.open()
        await wait_until(lambda: r.delivered() == r.program.emitted - r.drained("ring full"))
        r.pipe.stop()

    total = 2 * HELD_DOWNSTREAM + 1200
    assert r.program.events == total
    seqs = r.sink.seqs
    assert seqs == sorted(set(seqs))
    if overflow == "drain_oldest":
        # The kernel always found room: the oldest records were skipped, the newest kept.
        assert r.program.lost_reserve == 0
        assert r.drained("ring full") > 0
        assert seqs[-1] == total - 1  # the newest event was delivered
        assert len(seqs) + r.drained("ring full") == total
    else:
        # Nothing drained: the ring filled and the kernel lost the newest events.
        assert r.drained("ring full") == 0
        assert r.program.lost_reserve > 0
        assert seqs == list(range(len(seqs)))  # the oldest events, without a gap
        assert len(seqs) + r.program.lost_reserve == total
    assert_balanced(r)


async def test_a_full_in_flight_budget_blocks_the_reader_like_a_full_channel() -> None:
    r = rig(capacity=16, max_inflight_events=3 * BATCH_RECORDS)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        r.program.fire(100)
        await wait_until(lambda: r.reader.statistics().records_read >= 4 * BATCH_RECORDS)
        await trio.sleep(0.05)
        # three batches admitted, a fourth in hand waiting for room: the channels are not full
        assert r.reader.statistics().records_read == 4 * BATCH_RECORDS
        assert r.pipe.budget.events == 3 * BATCH_RECORDS
        assert all(edge.depth < edge.capacity for edge in r.pipe.edges)

        r.program.fire(430)  # 490 records in the ring: 95.7 % full
        await wait_until(lambda: r.drained("ring full") > 0)
        assert r.drained("ring full") == 234 and r.program.ring.usage() == 0.5

        r.valve.open()
        await wait_until(lambda: r.delivered() == 530 - 234)
        r.pipe.stop()
    assert r.sink.seqs == list(range(40)) + list(range(40 + 234, 530))
    assert r.pipe.budget.statistics().peak_events == 3 * BATCH_RECORDS
    assert_balanced(r)


async def test_memory_pressure_drains_everything_committed_while_blocked() -> None:
    r = rig()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        await block_downstream(r)  # 50 records waiting: far below the high watermark
        r.pipe.pressure.memory = True  # what the resource enforcer sets
        await wait_until(lambda: r.drained("memory pressure") > 0)
        assert r.drained("memory pressure") == HELD_DOWNSTREAM
        assert r.program.ring.usage() == 0.0

        r.program.fire(100)  # more arrives while the pressure lasts: drained too
        await wait_until(lambda: r.drained("memory pressure") == HELD_DOWNSTREAM + 100)
        assert r.program.ring.usage() == 0.0

        r.pipe.pressure.memory = False
        r.program.fire(20)  # after it ends: kept, and delivered once downstream moves
        await trio.sleep(0.05)
        assert r.drained("memory pressure") == HELD_DOWNSTREAM + 100
        assert r.drained("ring full") == 0
        r.valve.open()
        await wait_until(lambda: r.delivered() == HELD_DOWNSTREAM + 20)
        r.pipe.stop()

    first_new = 2 * HELD_DOWNSTREAM + 100
    assert r.sink.seqs == list(range(HELD_DOWNSTREAM)) + list(range(first_new, first_new + 20))
    assert_balanced(r)


async def test_block_never_drains_even_under_memory_pressure() -> None:
    r = rig(overflow="block")
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        await block_downstream(r)
        r.pipe.pressure.memory = True
        r.program.fire(600)  # more than the ring's 512 slots
        await trio.sleep(0.05)
        snap = r.pipe.ledger.snapshot()
        assert snap.total(Outcome.DRAINED) == 0
        assert r.program.lost_reserve == 2 * HELD_DOWNSTREAM + 600 - HELD_DOWNSTREAM - 511
        r.valve.open()
        await wait_until(lambda: r.delivered() == r.program.emitted)
        r.pipe.stop()
    assert r.pipe.ledger.snapshot().total(Outcome.DRAINED) == 0
    assert r.sink.seqs == list(range(r.program.emitted))
    assert_balanced(r)


async def test_a_full_ring_is_not_drained_while_downstream_keeps_up() -> None:
    r = rig(drain_check_s=1.0)
    r.valve.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.pipe.run)
        r.program.fire(500)  # 98 % full at once, but the sink takes everything
        await wait_until(lambda: r.delivered() == 500)
        r.pipe.stop()
    assert r.pipe.ledger.snapshot().total(Outcome.DRAINED) == 0
    assert r.sink.seqs == list(range(500))
    assert_balanced(r)


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(0.5, 0.5), (0.8, 0.6)])
def test_the_low_watermark_must_be_below_the_high_one(low: float, high: float) -> None:
    message = f"drain_low_watermark ({low}) must be below drain_high_watermark ({high})"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RingBufferReaderConfig(drain_low_watermark=low, drain_high_watermark=high)
    with pytest.raises(msgspec.ValidationError, match="must be below"):
        msgspec.convert({"drain_low_watermark": low, "drain_high_watermark": high}, RingBufferReaderConfig)
    RingBufferReaderConfig(
        drain_low_watermark=min(low, high) - 0.1, drain_high_watermark=max(low, high), wakeup_watermark=0.25
    )
