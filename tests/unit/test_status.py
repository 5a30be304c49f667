"""``/status`` and the admin tap (pipeline.status), against pipelines built from specs."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from pipeline import Batch, BatchSender, BatchStage, NodeSpec, Pipeline, Source, StageContext
from pipeline.http import asgi_app
from pipeline.status import LatencyMeter, RateWindow, StatusApi, Tap, Totals
from pipeline.testing import TestingSink, TestingSource, TestingSourceConfig, make_batch, settings, wait_until
from stages.breaker import CircuitBreakerStage
from stages.sampler import AdaptiveSampler

UNBOUNDED = settings(limits={"max_inflight_events": 0, "max_inflight_bytes": 0})


def numbered(n_batches: int, size: int) -> list[Batch]:
    return [make_batch(seq=i, value=np.arange(i * size, (i + 1) * size)) for i in range(n_batches)]


class Passthrough(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch


class DropOdd(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch.select(batch.events["value"] % 2 == 0)


@dataclass(frozen=True)
class FakeAttachment:
    function: str
    prog_id: int
    attach_point: str


class FakeProgram:
    """A loaded BPF program as /status sees it (a SamplingGate and TrimmableMaps)."""

    name = "exec"
    map_size = 1024

    def __init__(self) -> None:
        self.attachments = (
            FakeAttachment(
                "tracepoint__sched__sched_process_exec", 41, "tracepoint:sched:sched_process_exec"
            ),
            FakeAttachment(
                "tracepoint__sched__sched_process_exit", 42, "tracepoint:sched:sched_process_exit"
            ),
        )
        self.closed = False
        self.detached = False
        self.rate = 1

    def set_sample_rate(self, rate: int) -> None:
        self.rate = rate

    def sample_rate(self) -> int:
        return self.rate

    def growing_maps(self) -> dict[str, int]:
        return {"exec_procs": 17}

    def evict_oldest(self, map_name: str, keep: int) -> int:
        return 0


class ProgramSource(Source):
    """Publishes a FakeProgram, sends its batches, then waits until stopped."""

    def __init__(self, config: TestingSourceConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.program = FakeProgram()

    Config = TestingSourceConfig

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.ctx.publish(self.program)
        task_status.started()
        for batch in self.config.batches:
            self.ctx.produced(len(batch), batch.weight_sum)
            await tx.send(batch)
        await trio.sleep_forever()


class EndlessSource(Source):
    """A fresh 4-event batch every millisecond until stopped."""

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        seq = 0
        while True:
            batch = make_batch(seq=seq, value=np.arange(seq * 4, seq * 4 + 4))
            self.ctx.produced(len(batch))
            await tx.send(batch)
            seq += 1
            await trio.sleep(0.001)


# -- pure cores ---------------------------------------------------------------------------


def test_rates_are_differences_over_the_window() -> None:
    window = RateWindow(window_s=5.0)
    assert window.rates(0.0, Totals())["events_per_s"] is None  # no earlier sample: no rate
    window.add(0.0, Totals(produced=100, dropped=3, latency_sum_ns=0, latency_events=0))
    window.add(1.0, Totals(produced=300, dropped=3))
    rates = window.rates(
        2.0,
        Totals(
            produced=500, delivered=400, dropped=13, sampled_out=20, latency_sum_ns=8000, latency_events=4
        ),
    )
    assert rates == {
        "window_s": 2.0,
        "events_per_s": 200.0,
        "delivered_per_s": 200.0,
        "drops_per_s": 5.0,
        "filtered_per_s": 0.0,
        "sampled_out_per_s": 10.0,
        "avg_latency_us": 2.0,
    }


def test_filtering_is_not_dropping() -> None:
    from pipeline import Ledger, Outcome

    ledger = Ledger()
    ledger.record_produced(10)
    ledger.record(Outcome.STAGE_DROPPED, 3, stage="f", reason="filtered")
    ledger.record(Outcome.STAGE_DROPPED, 2, stage="f", reason="error")
    ledger.record(Outcome.DRAINED, 1, stage="r", reason="ring full")
    ledger.record(Outcome.USER_SAMPLED_OUT, 4, stage="s")
    totals = Totals.read(ledger.snapshot(), LatencyMeter())
    assert (totals.produced, totals.filtered, totals.dropped, totals.sampled_out) == (10, 3, 3, 4)


def test_rate_window_forgets_samples_older_than_the_window() -> None:
    window = RateWindow(window_s=5.0)
    for t in range(20):
        window.add(float(t), Totals(produced=t * 10))
    rates = window.rates(20.0, Totals(produced=200))
    assert rates["window_s"] is not None and 5.0 <= rates["window_s"] <= 6.0
    assert rates["events_per_s"] == pytest.approx(10.0)


def test_latency_meter_weights_each_batch_by_its_events() -> None:
    now = [10_000]
    meter = LatencyMeter(clock_ns=lambda: now[0])
    batch = make_batch(value=[1, 2, 3])
    batch.read_time_ns = 7_000
    assert meter(batch) is batch
    small = make_batch(value=[1])
    small.read_time_ns = 9_000
    meter(small)
    assert (meter.sum_ns, meter.events) == (3 * 3000 + 1000, 4)


def test_tap_copies_only_what_it_still_needs() -> None:
    tap = Tap(5)
    first = make_batch(value=[0, 1, 2])
    tap(first)
    tap(make_batch(value=[3, 4, 5, 6]))
    tap(make_batch(value=[7]))
    assert tap.complete and tap.copied == 5 and tap.dropped_copies == 0
    taken = [tap.take(), tap.take()]
    assert tap.take() is None
    assert [b.events["value"].tolist() for b in taken if b is not None] == [[0, 1, 2], [3, 4]]
    first.events["value"][0] = 99  # a copy, not a view of the stage's batch
    assert taken[0] is not None and taken[0].events["value"][0] == 0


def test_a_full_tap_drops_its_own_copies_and_counts_them() -> None:
    tap = Tap(100, max_batches=1)
    tap(make_batch(value=[0, 1, 2]))
    tap(make_batch(value=[3, 4, 5, 6]))  # buffer full: these 4 copies are dropped
    assert (tap.copied, tap.dropped_copies) == (3, 4)
    assert tap.take() is not None
    tap(make_batch(value=[7, 8]))
    assert (tap.copied, tap.dropped_copies) == (5, 4)


async def test_a_tap_past_its_deadline_closes_itself_and_is_swept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from pipeline.status import _install

    specs = [NodeSpec("source", TestingSource, TestingSourceConfig(())), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    tap = Tap(5, deadline=trio.current_time() + 1.0)
    _install(pipe, pipe.contexts[0], tap)
    tap(make_batch(value=[1]))
    await trio.sleep(2.0)
    tap(make_batch(value=[2]))  # past the deadline: nothing copied, and it closes itself
    assert tap.closed and tap.copied == 1
    later = Tap(5)
    _install(pipe, pipe.contexts[0], later)
    assert pipe.contexts[0].taps == [later]  # the stale one swept


def test_tap_skips_heartbeats() -> None:
    from pipeline import HEARTBEAT_EVENT

    tap = Tap(3)
    heartbeat = make_batch(marker=[1])
    heartbeat.event_name = HEARTBEAT_EVENT
    tap(heartbeat)
    assert tap.copied == 0 and tap.take() is None


# -- the status document ------------------------------------------------------------------


async def test_status_document_describes_the_running_pipeline() -> None:
    specs = [
        NodeSpec("source", ProgramSource, TestingSourceConfig(tuple(numbered(6, 10)))),
        NodeSpec("drop-odd", DropOdd),
        NodeSpec("sampler", AdaptiveSampler),
        NodeSpec("guarded", CircuitBreakerStage.around(Passthrough)),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [4, 4, 4, 4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await nursery.start(api.run, pipe)
        sink = pipe.nodes[-1]
        assert isinstance(sink, TestingSink)
        await wait_until(lambda: sum(len(b) for b in sink.batches) == 30)
        doc = json.loads(json.dumps(api.document(pipe, maps=True)))
        without_maps = api.document(pipe)
        pipe.stop()
        await pipe.finished.wait()
        nursery.cancel_scope.cancel()  # the sampling helper
    assert [s["name"] for s in doc["stages"]] == ["source", "drop-odd", "sampler", "guarded", "sink"]
    by_name = {s["name"]: s for s in doc["stages"]}
    assert by_name["source"]["sent_events"] == 60
    assert by_name["drop-odd"]["received_events"] == 60
    assert by_name["drop-odd"]["dropped_events"] == 30
    assert by_name["sink"]["delivered_events"] == 30
    assert [c["name"] for c in doc["channels"]] == [
        "source->drop-odd",
        "drop-odd->sampler",
        "sampler->guarded",
        "guarded->sink",
    ]
    assert all(c["capacity"] == 4 and c["depth"] == 0 for c in doc["channels"])
    assert doc["programs"] == [
        {
            "name": "exec",
            "state": "LOADED",
            "ids": [41, 42],
            "attachments": [
                {
                    "function": "tracepoint__sched__sched_process_exec",
                    "prog_id": 41,
                    "attach_point": "tracepoint:sched:sched_process_exec",
                },
                {
                    "function": "tracepoint__sched__sched_process_exit",
                    "prog_id": 42,
                    "attach_point": "tracepoint:sched:sched_process_exit",
                },
            ],
            "sample_rate": 1,
            "maps": [{"program": "exec", "name": "exec_procs", "entries": 17, "max_entries": 1024}],
        }
    ]
    assert doc["maps"] == [{"program": "exec", "name": "exec_procs", "entries": 17, "max_entries": 1024}]
    assert without_maps["maps"] is None and "maps" not in without_maps["programs"][0]
    assert doc["sampling"] == {
        "user": [{"stage": "sampler", "sample_rate": 1, "gate_attached": True}],
        "kernel": [{"program": "exec", "sample_rate": 1}],
    }
    assert doc["breakers"] == [{"stage": "guarded", "state": "closed"}]
    assert by_name["guarded"]["details"]["breaker"]["state"] == "closed"
    assert doc["rings"] == []
    assert doc["accounting"]["produced"] == 60 and doc["accounting"]["pending"] == 0
    assert doc["accounting"]["outcomes"]["delivered"] == 30
    assert doc["state"] == "running" and doc["version"] and doc["uptime_s"] >= 0
    # Latency is measured at the sink: 30 events, a duration that cannot be negative.
    assert api.latency.events == 30
    assert doc["performance"]["avg_latency_us"] is not None and doc["performance"]["avg_latency_us"] >= 0


async def test_a_closed_program_is_not_loaded() -> None:
    specs = [NodeSpec("source", ProgramSource, TestingSourceConfig(())), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        source = pipe.nodes[0]
        assert isinstance(source, ProgramSource)
        source.program.detached = True
        assert api.document(pipe)["programs"][0]["state"] == "NOT LOADED"
        source.program.closed = True
        doc = api.document(pipe, maps=True)
        pipe.stop()
    assert doc["programs"][0]["state"] == "NOT LOADED"
    assert doc["programs"][0]["sample_rate"] is None and doc["maps"] == []


async def test_rates_are_against_the_sample_taken_before() -> None:
    specs = [
        NodeSpec("source", TestingSource, TestingSourceConfig(tuple(numbered(5, 10)))),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    # The totals before anything was produced, as if sampled 2 s ago.
    api.window.add(time.monotonic() - 2.0, Totals.read(pipe.ledger.snapshot(), api.latency))
    await pipe.run()
    performance = api.document(pipe)["performance"]
    assert performance["window_s"] >= 2.0
    assert performance["events_per_s"] == pytest.approx(50 / performance["window_s"], rel=0.01)
    assert performance["drops_per_s"] == 0.0


# -- the tap over HTTP (the ASGI app driven in-process) -----------------------------------


async def call(
    app: Any, path: str, query: str, *, disconnect_after_s: float | None = None
) -> tuple[int, list[bytes], bytes]:
    """Drive the ASGI app like hypercorn does; returns (status, body chunks, whole body)."""
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect_after_s is None:
            await trio.sleep_forever()
        await trio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(), "headers": []}
    await app(scope, receive, send)
    status = sent[0]["status"]
    chunks = [m.get("body", b"") for m in sent[1:] if m.get("body")]
    return status, chunks, b"".join(chunks)


def lines_of(body: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = [json.loads(line) for line in body.splitlines()]
    assert "_tap" in rows[-1], rows
    return rows[:-1], rows[-1]["_tap"]


async def test_tap_streams_count_events_leaving_a_stage_and_unhooks_itself() -> None:
    specs = [NodeSpec("source", EndlessSource), NodeSpec("drop-odd", DropOdd), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4, 4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    app = asgi_app(api.admin_routes(pipe))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        status, _, body = await call(app, "/admin/tap", "stage=drop-odd&count=5&timeout_s=30")
        assert pipe.contexts[1].taps == []
        status_sink, _, body_sink = await call(app, "/admin/tap", "stage=sink&count=3&timeout_s=30")
        assert len(pipe.sink_observers) == 0
        pipe.stop()
    assert status == 200 and status_sink == 200
    events, summary = lines_of(body)
    assert len(events) == 5
    assert all(e["value"] % 2 == 0 for e in events)  # what *leaves* drop-odd
    assert set(events[0]) == {"value", "weight"}
    assert summary == {"stage": "drop-odd", "events": 5, "dropped_copies": 0, "ended": "count"}
    events, summary = lines_of(body_sink)
    assert len(events) == 3 and summary["events"] == 3 and summary["ended"] == "count"
    pipe.ledger.check_conserved()  # the tap took copies, never events
    assert (
        pipe.statistics().ledger.by_outcome()["stage_dropped"]
        == pipe.statistics().stage("drop-odd").dropped_events
    )


async def test_tap_ends_at_its_timeout_with_what_it_has(autojump_clock: trio.testing.MockClock) -> None:
    specs = [NodeSpec("source", ProgramSource, TestingSourceConfig(())), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    app = asgi_app(api.admin_routes(pipe))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        status, _, body = await call(app, "/admin/tap", "stage=source&count=5&timeout_s=2")
        assert pipe.contexts[0].taps == [] and api.active_taps == 0
        pipe.stop()
    events, summary = lines_of(body)
    assert status == 200 and events == []
    assert summary == {"stage": "source", "events": 0, "dropped_copies": 0, "ended": "timeout"}


async def test_tap_unhooks_when_the_client_goes_away(autojump_clock: trio.testing.MockClock) -> None:
    specs = [NodeSpec("source", ProgramSource, TestingSourceConfig(())), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    app = asgi_app(api.admin_routes(pipe))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        with trio.fail_after(5):  # well before the tap's own 60 s timeout (mock clock)
            _, _, body = await call(
                app, "/admin/tap", "stage=sink&count=5&timeout_s=60", disconnect_after_s=1
            )
        assert pipe.sink_observers == [] and api.active_taps == 0
        pipe.stop()
    _, summary = lines_of(body)
    assert summary["ended"] == "client gone"


async def test_a_tap_nobody_reads_never_blocks_the_stage() -> None:
    """A full tap drops its own copies (counted); every pipeline event is still delivered."""
    specs = [
        NodeSpec("source", TestingSource, TestingSourceConfig(tuple(numbered(20, 10)))),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [2], settings=UNBOUNDED)
    tap = Tap(1000, max_batches=1)
    pipe.contexts[0].taps.append(tap)
    with trio.fail_after(10):
        await pipe.run()
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    assert sum(len(b) for b in sink.batches) == 200
    assert (tap.copied, tap.dropped_copies) == (10, 190)
    pipe.ledger.check_conserved()


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("stage=nope", 404, "no stage 'nope' (stages: source, sink)"),
        ("", 400, "stage: required (stages: source, sink)"),
        ("stage=sink&count=0", 400, "count: must be in 1..100000, got 0"),
        ("stage=sink&count=x", 400, "count: expected a number, got 'x'"),
        ("stage=sink&timeout_s=nan", 400, "timeout_s: must be in 0.001..3600.0, got nan"),
    ],
)
async def test_tap_rejects_bad_requests_in_one_line(query: str, status: int, message: str) -> None:
    specs = [NodeSpec("source", TestingSource, TestingSourceConfig(())), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    app = asgi_app(StatusApi(UNBOUNDED).admin_routes(pipe))
    got, _, body = await call(app, "/admin/tap", query)
    assert (got, json.loads(body)) == (status, {"error": message})
    assert pipe.contexts[1].taps == [] and pipe.sink_observers == []


async def test_status_route_answers_json() -> None:
    specs = [
        NodeSpec("source", TestingSource, TestingSourceConfig(tuple(numbered(2, 3)))),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    app = asgi_app(api.routes(pipe))
    await pipe.run()
    status, _, body = await call(app, "/status", "maps=1")
    doc = json.loads(body)
    assert status == 200
    assert doc["accounting"]["produced"] == 6 and doc["programs"] == [] and doc["maps"] == []
    assert api.latency.events == 6  # routes() hooked the latency meter at the sink


# -- the clients' rendering (pipeline._diag) ------------------------------------------------


def test_diag_report_has_the_seeds_sections() -> None:
    from pipeline._diag import render_diag

    status = {
        "version": "0.1.0",
        "uptime_s": 12.0,
        "programs": [
            {
                "name": "exec",
                "state": "LOADED",
                "ids": [41],
                "attachments": [{"function": "f", "prog_id": 41, "attach_point": "tracepoint:sched:x"}],
            }
        ],
        "maps": [{"program": "exec", "name": "exec_procs", "entries": 1234, "max_entries": 65536}],
        "performance": {
            "window_s": 5.0,
            "events_per_s": 2000.0,
            "drops_per_s": 1.5,
            "avg_latency_us": 640.25,
        },
    }
    health = {
        "healthy": False,
        "details": [
            {"name": "programs_loaded", "healthy": True, "critical": True, "message": "exec: loaded"},
            {"name": "ringbuf_usage", "healthy": False, "critical": False, "message": "93 %"},
        ],
    }
    assert render_diag(status, health).splitlines() == [
        "bpfpipe 0.1.0 — up 12.0 s",
        "Programs:",
        "  exec: LOADED (ID: 41)",
        "    f -> tracepoint:sched:x (ID: 41)",
        "Maps:",
        "  exec/exec_procs: 1,234 / 65,536 entries",
        "Performance (last 5 s):",
        "  Events/s: 2,000.0",
        "  Drops/s: 1.5",
        "  Average latency: 640.2 µs",
        "Health:",
        "  programs_loaded: OK [CRITICAL]: exec: loaded",
        "  ringbuf_usage: FAILED: 93 %",
        "  overall: UNHEALTHY",
    ]
    unknown = render_diag({"performance": {}}, None, "/health/ready answered HTTP 404")
    assert "  Events/s: n/a" in unknown.splitlines()
    assert unknown.splitlines()[-1] == "  unknown: /health/ready answered HTTP 404"


def test_top_rates_per_stage_come_from_two_documents() -> None:
    from rich.console import Console

    from pipeline._diag import render_top

    def doc(uptime: float, sent: int) -> dict[str, Any]:
        return {
            "uptime_s": uptime,
            "stages": [
                {
                    "name": "src",
                    "kind": "source",
                    "received_events": 0,
                    "sent_events": sent,
                    "dropped_events": 0,
                    "delivered_events": 0,
                    "errors": 0,
                },
                {
                    "name": "out",
                    "kind": "sink",
                    "received_events": sent,
                    "sent_events": 0,
                    "dropped_events": 0,
                    "delivered_events": sent,
                    "errors": 0,
                },
            ],
            "channels": [{"name": "src->out", "depth": 3, "capacity": 16, "peak_depth": 9}],
            "sampling": {"user": [{"stage": "s", "sample_rate": 4}], "kernel": []},
            "breakers": [{"stage": "guard", "state": "open"}],
            "rings": [{"stage": "src", "program": "exec", "ring_usage": 0.25, "peak_ring_usage": 0.5}],
        }

    console = Console(width=140, record=True)
    console.print(render_top(doc(12.0, 5000), "", "127.0.0.1:1", 1.0, doc(10.0, 1000)))
    screen = console.export_text()
    assert re.search(r"src\s+│\s+source\s+│\s+2,000\.0\s+│", screen), screen
    assert re.search(r"out\s+│\s+sink\s+│\s+2,000\.0\s+│", screen), screen
    assert re.search(r"src->out\s+│\s+3\s+│\s+16\s+│\s+9", screen), screen
    assert "1 in 4" in screen and "open" in screen and "25.0% (peak 50.0%)" in screen
    console = Console(width=140, record=True)
    console.print(render_top(None, "no agent answering", "127.0.0.1:1", 1.0))
    assert "agent unreachable: no agent answering (retrying)" in console.export_text()


async def test_status_and_tap_follow_a_live_graph_switch() -> None:
    """The graph is read per request: after ``replace_chain`` the new stages are listed
    and tappable, with no stale reference to the old lists."""
    specs = [NodeSpec("source", EndlessSource), NodeSpec("drop-odd", DropOdd), NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4, 4], settings=UNBOUNDED)
    api = StatusApi(UNBOUNDED)
    app = asgi_app(api.admin_routes(pipe))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        before = [s["name"] for s in api.document(pipe)["stages"]]
        await pipe.replace_chain([NodeSpec("pass", Passthrough), NodeSpec("sink2", TestingSink)], [2, 2])
        doc = api.document(pipe)
        status, _, body = await call(app, "/admin/tap", "stage=pass&count=3&timeout_s=30")
        gone, _, _ = await call(app, "/admin/tap", "stage=drop-odd&count=1")
        pipe.stop()
    assert before == ["source", "drop-odd", "sink"]
    assert [s["name"] for s in doc["stages"]][:3] == ["source", "pass", "sink2"]
    assert [c["name"] for c in doc["channels"]][:2] == ["source->pass", "pass->sink2"]
    events, summary = lines_of(body)
    assert status == 200 and len(events) == 3 and summary["ended"] == "count"
    assert gone == 404
    pipe.ledger.check_conserved()
