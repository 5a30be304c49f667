"""The graph runtime: delivery, end-of-stream, error policy, shutdown, budget, accounting."""

from __future__ import annotations

import time

import numpy as np
import pytest
import trio
import trio.testing

from pipeline import (
    Batch,
    BatchReceiver,
    BatchSender,
    BatchSink,
    BatchStage,
    InflightBudget,
    Ledger,
    NodeSpec,
    Outcome,
    Pipeline,
    Stage,
    StageContext,
    per_event,
)
from pipeline._channel import Edge
from pipeline.errors import StageStartError
from pipeline.testing import TestingSink, TestingSource, TestingSourceConfig, make_batch, run_stages, settings
from stages.noop import NoopStage
from stages.null_sink import NullSink
from stages.synthetic import SyntheticConfig, SyntheticSource, split_lost


def numbered(n_batches: int, size: int) -> list[Batch]:
    return [make_batch(seq=i, value=np.arange(i * size, (i + 1) * size)) for i in range(n_batches)]


class DropOdd(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch.select(batch.events["value"] % 2 == 0)


class FailOnThird(BatchStage):
    calls = 0

    def process(self, batch: Batch) -> Batch:
        FailOnThird.calls += 1
        if FailOnThird.calls == 3:
            raise ValueError("boom")
        return batch


class DiesAfterOne(Stage):
    async def run(self, rx: BatchReceiver, tx: BatchSender, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        batch = await rx.receive()
        await tx.send(batch)
        raise RuntimeError("stage crashed")


class SwallowsSilently(Stage):
    async def run(self, rx: BatchReceiver, tx: BatchSender, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for _ in rx:
            pass


class FailsToStart(Stage):
    async def run(self, rx: BatchReceiver, tx: BatchSender, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("device busy")


async def test_delivers_everything_in_order_and_balances() -> None:
    result = await run_stages([NoopStage, NoopStage], numbered(20, 7))
    assert result.events["value"].tolist() == list(range(140))
    assert result.ledger.produced == 140
    assert result.ledger.by_outcome()["delivered"] == 140
    assert result.ledger.pending == 0


async def test_filtered_events_are_recorded_as_dropped() -> None:
    result = await run_stages([DropOdd], numbered(3, 10))
    assert result.events["value"].tolist() == list(range(0, 30, 2))
    detail = {(d["stage"], d["reason"]): d["count"] for d in result.ledger.as_dict()["detail"]}  # type: ignore[union-attr]
    assert detail[("DropOdd-0", "filtered")] == 15
    assert result.ledger.pending == 0


async def test_process_error_is_counted_and_pipeline_continues() -> None:
    FailOnThird.calls = 0
    result = await run_stages([FailOnThird], numbered(5, 4))
    assert len(result.events) == 16
    stage = result.statistics.stage("FailOnThird-0")
    assert stage.errors == 1 and "boom" in stage.last_error
    assert result.ledger.total(Outcome.STAGE_DROPPED) == 4
    assert result.ledger.pending == 0


async def test_crashed_full_control_stage_does_not_block_upstream() -> None:
    result = await run_stages([DiesAfterOne], numbered(50, 3), capacity=1)
    assert len(result.events) == 3
    stage = result.statistics.stage("DiesAfterOne-0")
    assert stage.errors == 1
    assert result.ledger.total(Outcome.STAGE_DROPPED) == 147
    assert result.ledger.pending == 0


async def test_events_a_stage_swallows_are_recorded_unreported() -> None:
    result = await run_stages([SwallowsSilently], numbered(4, 5))
    assert result.events.size == 0
    reasons = {d["reason"] for d in result.ledger.as_dict()["detail"]}  # type: ignore[union-attr]
    assert reasons == {"unreported"}
    assert result.ledger.pending == 0


async def test_stage_that_fails_before_ready_stops_startup_naming_it() -> None:
    with pytest.raises(StageStartError) as info:
        await run_stages([NoopStage, FailsToStart], numbered(1, 1))
    assert str(info.value) == "stage 'FailsToStart-1' failed to start: OSError: device busy"


class FailingSink(BatchSink):
    async def write(self, batch: Batch) -> None:
        if batch.seq % 2:
            raise OSError("disk full")


async def test_sink_write_errors_are_dropped_with_reason() -> None:
    specs = [
        NodeSpec("src", TestingSource, TestingSourceConfig(tuple(numbered(4, 2)))),
        NodeSpec("sink", FailingSink),
    ]
    pipe = Pipeline(specs, [2])
    await pipe.run()
    ledger = pipe.ledger.snapshot()
    assert ledger.total(Outcome.DELIVERED) == 4
    assert ledger.total(Outcome.STAGE_DROPPED) == 4
    assert pipe.statistics().stage("sink").errors == 2


def test_per_event_decorator() -> None:
    @per_event
    def keep_even_double(event: np.record) -> bool:
        event.value *= 2
        return bool(event.value % 4 == 0)

    async def main() -> None:
        original = make_batch(value=[1, 2, 3, 4])
        result = await run_stages([keep_even_double], [original])
        assert result.events["value"].tolist() == [4, 8]
        assert original.events["value"].tolist() == [1, 2, 3, 4]  # inputs are never mutated
        assert result.ledger.pending == 0

    trio.run(main)
    assert keep_even_double.__name__ == "keep_even_double"


class SlowSink(BatchSink):
    async def write(self, batch: Batch) -> None:
        await trio.sleep(0.01)


async def test_graceful_stop_drains_everything_admitted(autojump_clock: trio.testing.MockClock) -> None:
    specs = [
        NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=10)),
        NodeSpec("noop", NoopStage),
        NodeSpec("sink", SlowSink),
    ]
    pipe = Pipeline(specs, [4, 4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(1)
        pipe.stop()
    ledger = pipe.ledger.snapshot()
    sent = pipe.statistics().stage("src").sent_events
    assert sent > 0
    assert ledger.total(Outcome.DELIVERED) == sent  # everything admitted reaches the sink
    # the source waits for room before it makes (and counts) a batch: a graceful stop
    # leaves nothing produced and unsent, so nothing reads as stage_dropped
    assert ledger.produced == sent
    assert ledger.total(Outcome.STAGE_DROPPED) == 0
    assert ledger.pending == 0
    assert pipe.budget.events == 0


async def test_abort_records_leftovers_as_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    specs = [
        NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=10)),
        NodeSpec("noop", NoopStage),
        NodeSpec("sink", SlowSink),
    ]
    pipe = Pipeline(specs, [4, 4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(1)
        pipe.abort()
    ledger = pipe.ledger.snapshot()
    assert ledger.pending == 0
    shutdown = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "shutdown")
    unsent = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "stopped before send")
    assert shutdown > 0
    assert ledger.total(Outcome.DELIVERED) + shutdown + unsent == ledger.produced


async def test_inflight_budget_bounds_events(autojump_clock: trio.testing.MockClock) -> None:
    specs = [
        NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=100, total_events=10_000)),
        NodeSpec("a", NoopStage),
        NodeSpec("b", NoopStage),
        NodeSpec("sink", SlowSink),
    ]
    pipe = Pipeline(specs, [50, 50, 50], settings=settings(limits={"max_inflight_events": 300}))
    await pipe.run()
    stats = pipe.statistics()
    assert stats.budget.peak_events <= 300
    assert stats.budget.waits > 0
    assert stats.edges[-1].peak_depth >= 1  # the slow sink's queue filled
    assert stats.ledger.total(Outcome.DELIVERED) == 10_000


async def test_full_waits_count_the_times_a_producer_found_its_channel_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A slow sink behind a 2-batch channel: the stage before it finds that channel full and
    # waits (``send``), and the source finds its own full behind it (``wait_room``). A fast
    # sink's channel is never full, and the in-flight budget's waits are not the channel's.
    specs = [
        NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=10, total_events=2_000)),
        NodeSpec("noop", NoopStage),
        NodeSpec("sink", SlowSink),
    ]
    pipe = Pipeline(specs, [2, 2])
    await pipe.run()
    to_noop, to_sink = pipe.statistics().edges
    assert to_sink.full_waits > 0
    assert to_noop.full_waits > 0
    assert to_sink.full_waits <= to_sink.sent_batches

    fast = Pipeline(
        [
            NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=10, total_events=2_000)),
            NodeSpec("sink", NullSink),
        ],
        [64],
        settings=settings(limits={"max_inflight_events": 20}),
    )
    await fast.run()
    stats = fast.statistics()
    assert stats.budget.waits > 0
    assert stats.edges[0].full_waits == 0


async def test_statistics_report_depth_within_capacity() -> None:
    specs = [
        NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=10, total_events=5_000)),
        NodeSpec("noop", NoopStage),
        NodeSpec("sink", NullSink),
    ]
    pipe = Pipeline(specs, [3, 2])
    await pipe.run()
    stats = pipe.statistics()
    assert [e.capacity for e in stats.edges] == [3, 2]
    assert all(0 <= e.peak_depth <= e.capacity for e in stats.edges)
    assert stats.stage("noop").received_events == stats.stage("noop").sent_events == 5_000
    assert stats.as_dict()["accounting"]["pending"] == 0  # type: ignore[index]


async def test_synthetic_source_is_deterministic_and_rate_limited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def run_once() -> tuple[np.ndarray, float]:
        specs = [
            NodeSpec(
                "src",
                SyntheticSource,
                SyntheticConfig(rate_per_s=1000, batch_size=50, seed=7, total_events=5000),
            ),
            NodeSpec("sink", TestingSink),
        ]
        pipe = Pipeline(specs, [4])
        start = trio.current_time()
        await pipe.run()
        sink = pipe.nodes[-1]
        assert isinstance(sink, TestingSink)
        return np.concatenate([b.events for b in sink.batches]), trio.current_time() - start

    first, elapsed = await run_once()
    second, _ = await run_once()
    assert first["seq"].tolist() == list(range(5000))
    assert np.array_equal(first[["pid", "cpu", "type", "value"]], second[["pid", "cpu", "type", "value"]])
    assert 4.9 <= elapsed <= 5.2  # 5000 events at 1000/s


async def test_synthetic_source_reports_how_long_back_pressure_held_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class SlowSink(NullSink):
        async def write(self, batch: Batch) -> None:
            await trio.sleep(len(batch) / 1000)  # 1000 events/s

    async def blocked_after(rate: float, seconds: float) -> tuple[float, float, float]:
        config = SyntheticConfig(rate_per_s=rate, batch_size=10)
        pipe = Pipeline([NodeSpec("src", SyntheticSource, config), NodeSpec("sink", SlowSink)], [2])
        async with trio.open_nursery() as nursery:
            await nursery.start(pipe.run)
            await trio.sleep(seconds)
            source = pipe.nodes[0]
            assert isinstance(source, SyntheticSource)
            result = (source.blocked_s, source.throttled_events, source.late_events)
            pipe.stop()
        return result

    blocked, throttled, late = await blocked_after(500, 10)
    assert blocked == throttled == 0.0 and late < 1  # the sink keeps up: never held back
    blocked, throttled, late = await blocked_after(10_000, 10)  # 10x what the sink takes
    assert 8.0 <= blocked <= 10.0  # held back nearly all the time
    assert 85_000 <= throttled <= 91_000  # ~9000 events/s never made, for back-pressure
    assert late < 1  # the virtual clock never runs late (float rounding aside)


async def test_synthetic_source_counts_events_it_made_late_apart_from_throttled() -> None:
    class StallingSink(NullSink):
        stalls = 0

        async def write(self, batch: Batch) -> None:
            if self.stalls < 3:  # blocks the one event loop, source included (real clock)
                self.stalls += 1
                time.sleep(0.1)

    config = SyntheticConfig(rate_per_s=1000, batch_size=10)
    pipe = Pipeline([NodeSpec("src", SyntheticSource, config), NodeSpec("sink", StallingSink)], [64])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.6)
        pipe.stop()
    source = pipe.nodes[0]
    assert isinstance(source, SyntheticSource)
    assert source.throttled_events == 0.0  # the channel never filled
    assert 200 <= source.late_events <= 400  # 3 stalls of 100+ ms: all but one batch's credit each


def test_a_spans_loss_is_throttled_only_for_the_time_it_waited_for_room() -> None:
    assert split_lost(1000.0, 0.0, 500_000.0) == (0.0, 1000.0)  # never waited: it ran late
    assert split_lost(1000.0, 0.001, 500_000.0) == (500.0, 500.0)  # waited 1 ms of a longer stall
    assert split_lost(1000.0, 0.5, 500_000.0) == (1000.0, 0.0)  # held back the whole span


async def test_synthetic_bursts_raise_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    config = SyntheticConfig(rate_per_s=100, burst_factor=10, burst_period_s=2, burst_duty=0.5, batch_size=10)
    specs = [NodeSpec("src", SyntheticSource, config), NodeSpec("sink", NullSink)]
    pipe = Pipeline(specs, [4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(10)
        pipe.stop()
    produced = pipe.ledger.produced
    # half the time at 1000/s, half at 100/s: ~5500 in 10 s
    assert 5000 <= produced <= 6000


def source_channel(max_events: int) -> tuple[BatchSender, BatchReceiver, InflightBudget, Edge]:
    """A source's sending end (it admits into an in-flight budget of ``max_events``), the
    receiving end of its 2-batch channel, the budget and the channel."""
    budget = InflightBudget(max_events=max_events)
    producer = StageContext("src", "source", Ledger(), budget)
    consumer = StageContext("sink", "sink", producer.ledger, budget)
    edge = Edge("src->sink", 2)
    return BatchSender(edge, producer, admits=True), BatchReceiver(edge, consumer), budget, edge


async def test_wait_room_then_send_nowait_never_blocks_and_respects_the_budget() -> None:
    tx, rx, budget, edge = source_channel(max_events=15)
    for _ in range(2):  # fills the channel
        assert await tx.wait_room(5, 0) is False  # room: no wait
        tx.send_nowait(make_batch(value=np.arange(5)))
    with pytest.raises(trio.WouldBlock):
        tx.send_nowait(make_batch(value=np.arange(5)))
    assert budget.events == 10 and edge.statistics().sent_events == 10  # nothing counted
    with trio.move_on_after(0.05) as waited:
        await tx.wait_room(5, 0)
    assert waited.cancelled_caught  # full channel: waits
    rx.receive_nowait()
    assert await tx.wait_room(5, 0) is False  # channel room again, and 5 + 5 fit the budget of 15
    tx.send_nowait(make_batch(value=np.arange(5)))
    with trio.move_on_after(0.05) as waited:
        rx.receive_nowait()
        await tx.wait_room(10, 0)  # 15 in flight already counted: 10 more do not fit
    assert waited.cancelled_caught
    async with trio.open_nursery() as nursery:  # a wait that ends in room says it waited
        result: list[bool] = []

        async def wait() -> None:
            result.append(await tx.wait_room(1, 0))

        nursery.start_soon(wait)
        await trio.sleep(0.02)
        assert not result  # 15 of 15 in flight: waits for the budget
        budget.release(5)
    assert result == [True]


async def test_has_room_says_whether_send_would_wait() -> None:
    tx, rx, _, _ = source_channel(max_events=12)
    batch = make_batch(value=np.arange(5))
    assert tx.has_room(batch)
    await tx.send(batch)
    assert tx.has_room(make_batch(value=np.arange(5)))  # 10 of 12 in flight, one slot left
    assert not tx.has_room(make_batch(value=np.arange(8)))  # the budget would wait
    await tx.send(make_batch(value=np.arange(5)))
    assert not tx.has_room(make_batch(value=np.arange(1)))  # the channel is full
    with trio.move_on_after(0.05) as waited:
        await tx.send(make_batch(value=np.arange(1)))
    assert waited.cancelled_caught  # and send does wait
    rx.receive_nowait()  # room in the channel; nothing released, so 10 of 12 still in flight
    assert not tx.has_room(make_batch(value=np.arange(5)))
    assert tx.has_room(make_batch(value=np.arange(2)))
    stage = StageContext("noop", "stage", Ledger(), InflightBudget(max_events=1))
    unbudgeted = BatchSender(Edge("a->b", 1), stage, admits=False)
    assert unbudgeted.has_room(make_batch(value=np.arange(100)))  # only a source admits
