"""Switching the stage chain live (``Pipeline.replace_chain``): under steady load every
event ends exactly once (delivered or filtered), each source's order holds across the
old and the new sink, the ledger balances, the source is never restarted; a stop or an
abort in the middle of a switch still accounts for everything. On trio's autojump
clock, except the output tests (a real writer thread)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _switch_doubles import (
    ExplodesWhenBuilt,
    FailsToStart,
    RecordingGate,
    RecordingSink,
    RecordingSinkConfig,
    SeqFilter,
    SeqFilterConfig,
    SeqSource,
    SeqSourceConfig,
    StuckSink,
    check_exactly_once,
    written,
)

from pipeline import (
    BatchSender,
    ChainSwitch,
    ChainSwitchError,
    InflightBudget,
    Ledger,
    NodeSpec,
    Outcome,
    Pipeline,
    StageContext,
    StageLoadError,
)
from pipeline._channel import Edge
from pipeline.errors import StageStartError
from pipeline.testing import make_batch, settings, wait_until
from stages.jsonl_sink import JsonLinesConfig, JsonLinesSink
from stages.noop import NoopStage
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig
from stages.synthetic import SyntheticConfig, SyntheticSource

SLOW = RecordingSinkConfig(per_batch_s=0.002)
"""Slower than the source (a batch every 1 ms): channels fill, the source waits."""


def seq_source(**config: Any) -> NodeSpec:
    return NodeSpec("source", SeqSource, SeqSourceConfig(**config))


def synthetic_source() -> NodeSpec:
    # wait_room + send_nowait, the other way a source sends
    return NodeSpec("source", SyntheticSource, SyntheticConfig(rate_per_s=8000, batch_size=8))


SOURCES = {"send": seq_source, "wait_room": synthetic_source}


def sink(name: str = "sink", config: RecordingSinkConfig = SLOW) -> NodeSpec:
    return NodeSpec(name, RecordingSink, config)


def node(pipe: Pipeline, index: int) -> Any:
    return pipe.nodes[index]


@pytest.mark.parametrize("source", sorted(SOURCES))
async def test_adding_a_filter_under_load_accounts_every_event_once_in_order(
    autojump_clock: trio.testing.MockClock, source: str
) -> None:
    pipe = Pipeline([SOURCES[source](), sink()], [4])
    the_source = node(pipe, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.2)
        old_sink = node(pipe, -1)
        switch = await pipe.replace_chain([NodeSpec("filter", SeqFilter), sink()], [4, 4])
        assert isinstance(switch, ChainSwitch)
        new_filter, new_sink = node(pipe, 1), node(pipe, 2)
        await trio.sleep(0.2)
        pipe.stop()

    delivered = check_exactly_once(pipe, [old_sink, new_sink], [new_filter])
    # The old chain delivered a whole prefix, the new one exactly the kept seqs after it.
    k = len(old_sink.seqs)
    sent = pipe.contexts[0].stats.sent_events
    assert k > 0 and old_sink.seqs == list(range(k))
    assert new_sink.seqs == [s for s in range(k, sent) if s % 2 == 0] != []
    assert len(delivered) < sent
    # Under back-pressure the old chain held events at the switch, and drained them all.
    assert switch.inflight_events > 0
    assert switch.drain_s > 0 and switch.total_s == switch.switch_s + switch.drain_s
    assert (switch.old, switch.new) == (("sink",), ("filter", "sink"))
    # One source, run once: never restarted.
    assert node(pipe, 0) is the_source and pipe.contexts[0].stats.produced_events == pipe.ledger.produced
    if isinstance(the_source, SeqSource):
        assert the_source.runs == 1
    assert old_sink.closed and new_sink.closed
    # The sink's counters went on from the old sink's: totals never go backwards.
    stats = pipe.statistics()
    assert stats.stage("sink").delivered_events == len(delivered)
    assert [s.name for s in stats.stages] == ["source", "filter", "sink"]
    assert pipe.switches == 1


async def test_replacing_the_sink(autojump_clock: trio.testing.MockClock) -> None:
    pipe = Pipeline([seq_source(), NodeSpec("noop", NoopStage), sink("out")], [2, 2])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.1)
        old_sink = node(pipe, -1)
        await pipe.replace_chain([NodeSpec("noop", NoopStage), sink("other")], [2, 2])
        new_sink = node(pipe, -1)
        await trio.sleep(0.1)
        pipe.stop()
    delivered = check_exactly_once(pipe, [old_sink, new_sink])
    assert old_sink.seqs and new_sink.seqs
    assert delivered == list(range(len(delivered)))  # nothing filtered: every seq, in order
    assert [s.name for s in pipe.statistics().stages] == ["source", "noop", "other"]
    assert pipe.statistics().stage("noop").sent_events == len(delivered)


async def test_removing_a_stage(autojump_clock: trio.testing.MockClock) -> None:
    pipe = Pipeline([seq_source(), NodeSpec("thirds", SeqFilter, SeqFilterConfig(modulus=3)), sink()], [3, 3])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.1)
        old_filter, old_sink = node(pipe, 1), node(pipe, 2)
        await pipe.replace_chain([sink()], [3])
        new_sink = node(pipe, -1)
        await trio.sleep(0.1)
        pipe.stop()
    check_exactly_once(pipe, [old_sink, new_sink], [old_filter])
    assert all(s % 3 == 0 for s in old_sink.seqs)
    start = new_sink.seqs[0]
    assert new_sink.seqs == list(range(start, pipe.contexts[0].stats.sent_events))  # unfiltered now
    assert len(pipe.nodes) == 2 and [s.name for s in pipe.specs] == ["source", "sink"]


@pytest.mark.parametrize(
    ("bad", "error"), [(ExplodesWhenBuilt, StageLoadError), (FailsToStart, StageStartError)]
)
async def test_a_stage_that_cannot_be_built_or_started_changes_nothing(
    autojump_clock: trio.testing.MockClock, bad: type, error: type[Exception]
) -> None:
    pipe = Pipeline([seq_source(), sink()], [4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.05)
        before = (list(pipe.nodes), list(pipe.contexts), list(pipe.edges), pipe.specs)
        with pytest.raises(error, match="bad"):
            await pipe.replace_chain([NodeSpec("bad", bad), sink("new")], [4, 4])
        assert (list(pipe.nodes), list(pipe.contexts), list(pipe.edges), pipe.specs) == before
        await trio.sleep(0.05)
        pipe.stop()
    delivered = check_exactly_once(pipe, [node(pipe, -1)])
    assert delivered == list(range(len(delivered))) and pipe.switches == 0


async def test_a_source_waiting_for_room_on_the_full_old_edge_moves_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The sink is slow, the channel full: the source waits for room with a batch in hand.
    # That batch has entered no channel, so it goes to the new chain; the switch does not
    # wait for the old chain to make room.
    pipe = Pipeline([seq_source(), sink(config=RecordingSinkConfig(per_batch_s=0.05))], [2])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.31)  # not a multiple of the sink's 0.05 s: mid-write, channel full
        old_sink = node(pipe, -1)
        tx = pipe._source_tx
        assert tx is not None and tx.holding_events == 8
        written_before = len(old_sink.seqs)
        switch = await pipe.replace_chain([sink("new", RecordingSinkConfig())], [2])
        new_sink = node(pipe, -1)
        await trio.sleep(0.1)
        pipe.stop()
    check_exactly_once(pipe, [old_sink, new_sink])
    assert switch.switch_s == 0  # no time passed: nothing was waited for
    # The old chain held the channel's two batches and the one being written ...
    assert switch.inflight_events == len(old_sink.seqs) - written_before == 3 * 8
    # ... and the held batch was the new sink's first.
    assert new_sink.seqs[0] == old_sink.seqs[-1] + 1


async def test_a_send_in_progress_completes_on_the_old_edge_and_the_move_follows() -> None:
    ctx = StageContext("source", "source", Ledger(), InflightBudget())
    old, new = Edge("old", 4), Edge("new", 4)
    tx = BatchSender(old, ctx, admits=False)
    entered, release = trio.Event(), trio.Event()
    real_send = old.send_channel.send

    async def held_send(batch: Any) -> None:  # a send that is in progress until released
        entered.set()
        await release.wait()
        await real_send(batch)

    old.send_channel.send = held_send  # type: ignore[method-assign]
    moved: list[Edge] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tx.send, make_batch(seq=0, x=[1, 2]))
        await entered.wait()
        assert tx.redirect(new, moved.append)
        assert not tx.redirect(new, moved.append)  # one move at a time
        await trio.sleep(0.01)
        assert moved == []  # not mid-send
        release.set()
    assert moved == [old]
    await tx.send(make_batch(seq=1, x=[3]))
    assert (old.sent_batches, old.sent_events, new.sent_batches, new.sent_events) == (1, 2, 1, 1)
    assert old.receive_channel.receive_nowait().seq == 0 and new.receive_channel.receive_nowait().seq == 1
    tx.close()
    assert not tx.redirect(Edge("later", 1), moved.append)  # closed: nothing to move


async def test_a_stop_while_the_old_chain_drains_drains_both_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipe = Pipeline([seq_source(), sink(config=RecordingSinkConfig(per_batch_s=0.01))], [4])
    results: list[ChainSwitch] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.2)
        old_sink = node(pipe, -1)

        async def switch() -> None:
            results.append(await pipe.replace_chain([NodeSpec("filter", SeqFilter), sink()], [4, 4]))

        nursery.start_soon(switch)
        await wait_until(lambda: node(pipe, -1) is not old_sink)  # switched, old chain draining
        # Both chains are visible while the old one drains; the sink's counters add up.
        stats = pipe.statistics()
        assert stats.stage("sink").delivered_events == len(old_sink.seqs)
        pipe.stop()
        with pytest.raises(ChainSwitchError, match="stopping"):  # waits for the first switch, then refuses
            await pipe.replace_chain([sink("third")], [4])
    new_filter, new_sink = node(pipe, 1), node(pipe, 2)
    check_exactly_once(pipe, [old_sink, new_sink], [new_filter])
    assert new_sink.seqs  # what the new edge buffered during the drain went through
    assert results and pipe.switches == 1


@pytest.mark.parametrize("when", ["at the switch", "old chain drains"])
async def test_an_abort_during_a_switch_still_accounts_every_event(
    autojump_clock: trio.testing.MockClock, when: str
) -> None:
    pipe = Pipeline([seq_source(), sink(config=RecordingSinkConfig(per_batch_s=0.05))], [3])
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.31)
        old_sink = node(pipe, -1)

        async def switch() -> None:
            try:
                await pipe.replace_chain([NodeSpec("filter", SeqFilter), sink()], [3, 3])
            except ChainSwitchError as exc:
                errors.append(exc)

        nursery.start_soon(switch)
        await wait_until(lambda: node(pipe, -1) is not old_sink)
        if when == "old chain drains":
            await trio.sleep(0.06)
        pipe.abort()
    assert len(errors) == 1 and "aborted" in str(errors[0])
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0 and ledger.produced == ledger.accounted
    shutdown = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "shutdown")
    unsent = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "stopped before send")
    assert shutdown > 0
    new_sink = node(pipe, -1)
    delivered = written([old_sink, new_sink] if new_sink is not old_sink else [old_sink])
    assert delivered == list(range(len(delivered)))  # a prefix, in order, once
    assert ledger.total(Outcome.DELIVERED) == len(delivered)
    assert len(delivered) + shutdown + unsent == ledger.produced


async def test_a_switch_requested_while_stopping_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    pipe = Pipeline([seq_source(), sink()], [4])
    with pytest.raises(ChainSwitchError, match="not running"):
        await pipe.replace_chain([sink("new")], [4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.05)
        pipe.stop()
        with pytest.raises(ChainSwitchError, match="stopping"):
            await pipe.replace_chain([sink("new")], [4])
    assert [s.name for s in pipe.specs] == ["source", "sink"]
    check_exactly_once(pipe, [node(pipe, -1)])


async def test_a_finished_source_refuses_a_switch(autojump_clock: trio.testing.MockClock) -> None:
    pipe = Pipeline([seq_source(total_events=40), sink(config=RecordingSinkConfig(per_batch_s=0.05))], [4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await wait_until(lambda: pipe.contexts[0].stats.sent_events == 40)
        await trio.sleep(0.01)
        with pytest.raises(ChainSwitchError, match="source has ended"):
            await pipe.replace_chain([sink("new")], [4])
    assert check_exactly_once(pipe, [node(pipe, -1)]) == list(range(40))


async def test_two_switches_are_serialized(autojump_clock: trio.testing.MockClock) -> None:
    pipe = Pipeline([seq_source(), sink("s0")], [3])
    sinks = [node(pipe, -1)]
    results: list[ChainSwitch] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.1)

        async def switch(specs: list[NodeSpec]) -> None:
            results.append(await pipe.replace_chain(specs, [3] * len(specs)))
            sinks.append(node(pipe, -1))

        async with trio.open_nursery() as switches:
            switches.start_soon(switch, [NodeSpec("filter", SeqFilter), sink("s1")])
            await trio.sleep(0)
            switches.start_soon(switch, [sink("s2")])
        await trio.sleep(0.1)
        pipe.stop()
    assert [r.new for r in results] == [("filter", "s1"), ("s2",)]
    assert [s.ctx.name for s in sinks] == ["s0", "s1", "s2"]
    # The second switch began after the first had drained: s1's filter saw its events.
    filters = [n for n in pipe._retired[1].nodes if isinstance(n, SeqFilter)]
    check_exactly_once(pipe, sinks, filters)
    assert pipe.switches == 2


async def test_gates_move_to_the_new_sampler_and_the_old_one_lets_go(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = RecordingGate()
    fixed = {"min_sample_rate": 4, "max_sample_rate": 4, "seed": 1}
    pipe = Pipeline(
        [
            seq_source(publish=gate),
            NodeSpec("sampler", AdaptiveSampler, AdaptiveSamplerConfig(**fixed)),  # type: ignore[arg-type]
            sink(config=RecordingSinkConfig()),
        ],
        [4, 4],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.1)
        old_sampler = node(pipe, 1)
        assert old_sampler.gates == [gate] and gate.rates[-1] == 4
        fixed8 = AdaptiveSamplerConfig(min_sample_rate=8, max_sample_rate=8, seed=2)
        await pipe.replace_chain(
            [NodeSpec("sampler", AdaptiveSampler, fixed8), sink(config=RecordingSinkConfig())], [4, 4]
        )
        new_sampler = node(pipe, 1)
        assert new_sampler.gates == [gate] and gate.rates[-1] == 8
        after = len(gate.rates)
        await trio.sleep(3.0)  # many adjust periods: only the new sampler may push
        assert set(gate.rates[after:]) <= {8}
        # A chain without a sampler: nobody controls the gate, so it goes back to 1.
        await pipe.replace_chain([sink("plain", RecordingSinkConfig())], [4])
        assert gate.rates[-1] == 1
        pipe.stop()
    assert pipe.ledger.pending == 0 and pipe.ledger.produced == pipe.ledger.accounted


@pytest.mark.parametrize("where", ["stdout", "file"])
async def test_the_output_goes_on_across_a_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "out.jsonl"
    if where == "stdout":
        stream = open(out, "w")  # noqa: SIM115 (closed below)
        monkeypatch.setattr(sys, "stdout", stream)
        path = "-"
    else:
        out.write_text('{"seq":-1}\n')  # a file the new sink must append to, not truncate
        path = str(out)
    jsonl = NodeSpec("sink", JsonLinesSink, JsonLinesConfig(path=path))
    pipe = Pipeline([seq_source(batch_size=4, interval_s=0.002), jsonl], [4])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await wait_until(lambda: pipe.ledger.snapshot().total(Outcome.DELIVERED) >= 40)
        await pipe.replace_chain([NodeSpec("filter", SeqFilter), jsonl], [4, 4])
        new_filter = node(pipe, 1)
        await wait_until(lambda: len(new_filter.removed) >= 20)
        pipe.stop()
    if where == "stdout":
        print("still open", flush=True)  # the process's stdout survived both sinks
        os.fstat(stream.fileno())
        monkeypatch.undo()
        stream.close()
    lines = out.read_text().splitlines()
    if where == "stdout":
        assert lines.pop() == "still open"
    else:
        assert lines.pop(0) == '{"seq":-1}'
    seqs = [json.loads(line)["seq"] for line in lines]
    sent = pipe.contexts[0].stats.sent_events
    assert all(a < b for a, b in itertools.pairwise(seqs))
    assert sorted(seqs + new_filter.removed) == list(range(sent))
    assert pipe.ledger.snapshot().total(Outcome.DELIVERED) == len(seqs) and pipe.ledger.pending == 0


async def test_a_cancelled_call_still_completes_its_switch_and_the_next_one_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipe = Pipeline([seq_source(), sink(config=RecordingSinkConfig(per_batch_s=0.05))], [2])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.31)
        old_sink = node(pipe, -1)
        with trio.move_on_after(0.001) as gave_up:  # the move waits for the send in progress
            await pipe.replace_chain([NodeSpec("filter", SeqFilter), sink("s1")], [2, 2])
        assert gave_up.cancelled_caught
        second = await pipe.replace_chain([sink("s2")], [2])
        assert second.old == ("filter", "s1")
        await trio.sleep(0.2)
        pipe.stop()
    chains = [*pipe._retired, pipe._chain]
    assert [c.nodes[-1].ctx.name for c in chains] == ["sink", "s1", "s2"]
    check_exactly_once(pipe, [c.nodes[-1] for c in chains], [chains[1].nodes[1]])  # type: ignore[list-item]
    assert chains[0].nodes[-1] is old_sink and pipe.switches == 2


async def test_sink_observers_see_every_batch_of_whichever_sink_is_current(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipe = Pipeline([seq_source(), sink()], [4])
    observed: list[int] = []

    def observe(batch: Any) -> Any:
        observed.extend(batch.events["seq"].tolist())
        return batch

    pipe.sink_observers.append(observe)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(0.1)
        old_sink = node(pipe, -1)
        await pipe.replace_chain([NodeSpec("filter", SeqFilter), sink()], [4, 4])
        new_filter, new_sink = node(pipe, 1), node(pipe, 2)
        await trio.sleep(0.1)
        pipe.stop()
    delivered = check_exactly_once(pipe, [old_sink, new_sink], [new_filter])
    assert observed == delivered and new_sink.seqs


async def test_an_old_chain_stuck_past_the_drain_deadline_is_cut_off_and_accounted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The sink being replaced hangs (the reason one would replace it): the switch may not
    # wait forever. Past shutdown.drain_timeout_s what the old chain holds is dropped.
    pipe = Pipeline(
        [seq_source(), NodeSpec("stuck", StuckSink)],
        [2],
        settings=settings(shutdown={"drain_timeout_s": 2.0}),
    )
    with trio.fail_after(60):  # virtual time: a switch that waits forever fails here at once
        async with trio.open_nursery() as nursery:
            await nursery.start(pipe.run)
            await trio.sleep(0.5)
            switch = await pipe.replace_chain([sink("fresh", RecordingSinkConfig())], [2])
            fresh = node(pipe, -1)
            await trio.sleep(0.5)
            pipe.stop()
    assert 2.0 <= switch.drain_s < 2.1 and switch.inflight_events > 0
    ledger = pipe.statistics().ledger
    timed_out = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "switch timeout")
    assert timed_out == switch.inflight_events  # the source was blocked: nothing else was in the old chain
    assert ledger.pending == 0 and ledger.produced == ledger.accounted
    # The new sink got everything sent after the switch, from the first seq on, in order.
    sent = pipe.contexts[0].stats.sent_events
    assert fresh.seqs == list(range(timed_out, sent)) != []
    assert ledger.total(Outcome.DELIVERED) == len(fresh.seqs)
