"""Readiness and the heartbeat with fakes: the JSON shape, the 503 rules, the heartbeat's path.

No kernel here: a fake source publishes a fake program (``pipeline.ProgramHealth``)
and makes heartbeats itself; the synthetic source is tested as it ships. The
heartbeat's deadline runs on trio's autojump clock.
"""

from __future__ import annotations

import json
import os
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
import trio.testing
from _stage_doubles import RecordsEventNames, Stall
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import (
    HEARTBEAT_EVENT,
    Batch,
    BatchSender,
    NodeSpec,
    Outcome,
    Pipeline,
    Source,
    StageContext,
)
from pipeline.health import (
    HEARTBEAT_REASON,
    CheckResult,
    HealthMonitor,
    HeartbeatTracker,
    readiness,
)
from pipeline.http import Request, Response
from pipeline.testing import TestingSink, settings, wait_until
from stages.breaker import CircuitBreakerStage
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig
from stages.synthetic import SyntheticConfig, SyntheticSource

HEARTBEAT_DTYPE = np.dtype([("ts_ns", "<u8"), ("marker", "<u8"), ("tgid", "<u4")])
CHECK_NAMES = [
    "pipeline",
    "programs_loaded",
    "maps_accessible",
    "ringbuf_usage",
    "event_processing",
    "heartbeat",
]


# -- the pure cores -------------------------------------------------------------------------


def test_tracker_round_trip_missed_and_deadline() -> None:
    t = HeartbeatTracker()
    assert t.check(0.0, 10.0) == (False, "no heartbeat sent yet")
    t.on_sent(7, now=1.0)
    ok, message = t.check(2.0, 10.0)
    assert not ok and message == "waiting for the first heartbeat (sent 1.0 s ago)"
    assert t.on_seen(7, now=1.25)
    ok, message = t.check(3.25, 10.0)
    assert ok and message == "last heartbeat left the last stage 2.0 s ago, round trip 250.0 ms"
    t.on_sent(8, now=4.0)
    t.on_sent(9, now=5.0)
    ok, message = t.check(14.0, 10.0)  # 8 is 10.0 s old: not past the deadline yet
    assert ok, message
    ok, message = t.check(14.5, 10.0)
    assert not ok
    assert message == (
        "heartbeat 8 sent 10.5 s ago has not left the last stage: 0.5 s past the 10 s deadline "
        "(last one seen 13.2 s ago)"
    )
    assert t.on_seen(9, now=15.0)  # 8 never came: given up, counted as missed
    assert t.check(15.0, 10.0)[0]
    assert not t.on_seen(8, now=15.5)  # too late: unexpected
    stats = t.statistics()
    assert (stats.sent, stats.seen, stats.missed, stats.unexpected) == (3, 2, 1, 1)
    assert stats.last_round_trip_s == pytest.approx(10.0)


def test_only_critical_failures_make_it_unready() -> None:
    ok = CheckResult("a", True, True, "fine")
    soft = CheckResult("b", False, False, "not great")
    hard = CheckResult("c", False, True, "broken")
    assert readiness([ok, soft], timestamp_ms=5).status == 200
    assert readiness([ok, soft], timestamp_ms=5).healthy
    result = readiness([ok, soft, hard], timestamp_ms=5)
    assert (result.status, result.healthy) == (503, False)
    assert result.as_dict() == {
        "healthy": False,
        "details": [
            {"name": "a", "healthy": True, "critical": True, "message": "fine"},
            {"name": "b", "healthy": False, "critical": False, "message": "not great"},
            {"name": "c", "healthy": False, "critical": True, "message": "broken"},
        ],
        "timestamp": 5,
    }


# -- fakes ----------------------------------------------------------------------------------


class FakeProgram:
    """A loaded program as the checks see it (``pipeline.ProgramHealth``)."""

    def __init__(self) -> None:
        self.name = "fakeprog"
        self.attachment: str | None = None
        self.maps: str | None = None

    def attachment_problem(self) -> str | None:
        return self.attachment

    def maps_problem(self) -> str | None:
        return self.maps


class FakeConfig(msgspec.Struct, frozen=True):
    program: bool = True
    heartbeats: bool = True


class FakeSource(Source):
    """Publishes a fake program, reports a ring usage, and answers heartbeats with a
    one-event heartbeat batch (as the kernel's, after decoding) — plus a trickle of
    ordinary events, one batch every 0.1 s."""

    Config = FakeConfig
    config: FakeConfig

    def __init__(self, config: FakeConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.program = FakeProgram()
        self.ring_usage = 0.0
        self.emit_events = True
        self._pending: list[int] = []

    def trigger_heartbeat(self, marker: int) -> None:
        self._pending.append(marker)

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self.config.program:
            self.ctx.publish(self.program)
        if self.config.heartbeats:
            self.ctx.publish(self)
        task_status.started()
        seq = 0
        while True:
            if self._pending:
                markers, self._pending = self._pending, []
                events = np.zeros(len(markers), dtype=HEARTBEAT_DTYPE)
                events["marker"] = markers
                events["tgid"] = os.getpid()
                self.ctx.produced(len(events))
                await tx.send(Batch(events, source=self.ctx.name, seq=seq, event_name=HEARTBEAT_EVENT))
                seq += 1
            if self.emit_events:
                events = np.zeros(4, dtype=[("pid", "<u4")])
                self.ctx.produced(len(events))
                await tx.send(Batch(events, source=self.ctx.name, seq=seq, event_name="fake"))
                seq += 1
            await trio.sleep(0.1)


def health_settings(**health: Any) -> Any:
    table = {"heartbeat_interval_s": 1.0, "heartbeat_deadline_s": 3.0, **health}
    return settings(health=table, limits={"max_inflight_events": 0, "max_inflight_bytes": 0})


def build(source: NodeSpec, *stages: NodeSpec, config: Any = None) -> tuple[Pipeline, HealthMonitor]:
    config = config or health_settings()
    monitor = HealthMonitor(config)
    specs = [source, *stages, NodeSpec("sink", TestingSink)]
    pipe = Pipeline(specs, [4] * (len(specs) - 1), settings=config, helpers=[monitor.run])
    return pipe, monitor


async def ready(monitor: HealthMonitor, pipe: Pipeline) -> tuple[int, dict[str, Any]]:
    """GET /health/ready through the route, as the server calls it."""
    (route,) = [r for r in monitor.routes(pipe) if r.path == "/health/ready"]
    response: Response = await route.handler(Request("GET", route.path, {}, {}))
    return response.status, json.loads(response.body)


def by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in body["details"]}


def sink_of(pipe: Pipeline) -> TestingSink:
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    return sink


# -- readiness ------------------------------------------------------------------------------


async def test_ready_json_shape_and_the_503_rules(autojump_clock: trio.testing.MockClock) -> None:
    pipe, monitor = build(NodeSpec("src", FakeSource))
    status, body = await ready(monitor, pipe)
    assert status == 503  # not started yet
    assert by_name(body)["pipeline"] == {
        "name": "pipeline",
        "healthy": False,
        "critical": True,
        "message": "starting",
    }
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        source = pipe.nodes[0]
        assert isinstance(source, FakeSource)
        await wait_until(
            lambda: monitor.statistics().get("src") is not None and monitor.statistics()["src"].seen > 0
        )
        await trio.sleep(1.5)  # a rate window
        status, body = await ready(monitor, pipe)
        assert status == 200, body
        assert set(body) == {"healthy", "details", "timestamp"}
        assert body["healthy"] is True
        assert isinstance(body["timestamp"], int) and body["timestamp"] > 1_700_000_000_000
        assert [d["name"] for d in body["details"]] == CHECK_NAMES
        for detail in body["details"]:
            assert set(detail) == {"name", "healthy", "critical", "message"}
            assert detail["healthy"] is True, detail
            assert isinstance(detail["message"], str) and detail["message"]
        assert [d["critical"] for d in body["details"]] == [True, True, True, False, False, True]
        checks = by_name(body)
        assert checks["programs_loaded"]["message"] == "fakeprog: loaded and attached"
        assert checks["ringbuf_usage"]["message"] == "below 90 %: src 0.0 %"
        assert checks["event_processing"]["message"].endswith(" s")
        assert "events/s" in checks["event_processing"]["message"]
        assert "round trip" in checks["heartbeat"]["message"]

        # A non-critical failure shows, and the agent stays ready.
        source.ring_usage = 0.95
        status, body = await ready(monitor, pipe)
        assert status == 200 and body["healthy"] is True
        assert by_name(body)["ringbuf_usage"] == {
            "name": "ringbuf_usage",
            "healthy": False,
            "critical": False,
            "message": "at or over 90 %: src 95.0 %",
        }
        monitor.update(health_settings(ringbuf_usage_limit_percent=99))  # live threshold
        status, body = await ready(monitor, pipe)
        assert by_name(body)["ringbuf_usage"]["healthy"] is True
        source.ring_usage = 0.0

        # A critical one makes it 503, and it recovers.
        source.program.attachment = "XDP program 42 is no longer attached to veth0 (now: none)"
        status, body = await ready(monitor, pipe)
        assert status == 503 and body["healthy"] is False
        assert by_name(body)["programs_loaded"] == {
            "name": "programs_loaded",
            "healthy": False,
            "critical": True,
            "message": "XDP program 42 is no longer attached to veth0 (now: none)",
        }
        source.program.attachment = None
        source.program.maps = "map bpfpipe_stats of 'fakeprog': fd 9 is closed"
        status, body = await ready(monitor, pipe)
        assert status == 503
        assert (
            by_name(body)["maps_accessible"]["message"] == "map bpfpipe_stats of 'fakeprog': fd 9 is closed"
        )
        source.program.maps = None
        assert (await ready(monitor, pipe))[0] == 200

        # Draining: 503 at once, before anything has drained.
        pipe.stop()
        source.program.attachment = "detached by the stop"  # what a stop does: not reported
        status, body = await ready(monitor, pipe)
        assert status == 503
        assert by_name(body)["pipeline"]["message"] == "draining: a stop was requested"
        assert by_name(body)["programs_loaded"] == {
            "name": "programs_loaded",
            "healthy": True,
            "critical": True,
            "message": "not checked: the pipeline is draining",
        }
    pipe.ledger.check_conserved()


async def test_no_programs_no_heartbeats_is_not_applicable_and_healthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipe, monitor = build(NodeSpec("src", FakeSource, FakeConfig(program=False, heartbeats=False)))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(1.5)
        status, body = await ready(monitor, pipe)
        assert status == 200, body
        checks = by_name(body)
        for name in ("programs_loaded", "maps_accessible"):
            assert checks[name]["healthy"] is True
            assert checks[name]["message"] == "not applicable: the source loads no BPF program"
        assert checks["heartbeat"]["message"] == "not applicable: the source makes no heartbeats"
        pipe.stop()


async def test_idle_source_fails_only_the_rate_check(autojump_clock: trio.testing.MockClock) -> None:
    pipe, monitor = build(NodeSpec("src", FakeSource))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        source = pipe.nodes[0]
        assert isinstance(source, FakeSource)
        source.emit_events = False  # only heartbeats flow now: they are not "events"
        await trio.sleep(5)
        status, body = await ready(monitor, pipe)
        assert status == 200, body
        rate = by_name(body)["event_processing"]
        assert rate["healthy"] is False and rate["critical"] is False
        assert rate["message"].startswith("no events in the last ")
        assert by_name(body)["heartbeat"]["healthy"] is True
        pipe.stop()


def health_metrics(monitor: HealthMonitor) -> dict[tuple[str, ...], float]:
    """The monitor's families as Prometheus would scrape them: (name, *label values) -> value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor)
    samples: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, *sample.labels.values())] = sample.value
    return samples


async def test_the_checks_are_metrics_too(autojump_clock: trio.testing.MockClock) -> None:
    pipe, monitor = build(NodeSpec("src", FakeSource))
    assert health_metrics(monitor) == {("bpfpipe_ready",): 0}  # not started
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        source = pipe.nodes[0]
        assert isinstance(source, FakeSource)

        # a heartbeat, a rate window, a run of the program checks (in a worker thread: the
        # autojump clock runs on while the thread works, so the waits are long in its time)
        def all_healthy() -> bool:
            samples = health_metrics(monitor)
            checks = [v for k, v in samples.items() if k[0] == "bpfpipe_health_check_healthy"]
            return samples[("bpfpipe_ready",)] == 1 and len(checks) == len(CHECK_NAMES) and all(checks)

        await wait_until(all_healthy, timeout=600)
        samples = health_metrics(monitor)
        assert {key[1:] for key in samples if key[0] == "bpfpipe_health_check_healthy"} == {
            (name, critical)
            for name, critical in zip(
                CHECK_NAMES, ["true", "true", "true", "false", "false", "true"], strict=True
            )
        }
        # A program check fails: seen at the monitor's next run (one interval), not before.
        source.program.attachment = "detached from outside"
        assert health_metrics(monitor)[("bpfpipe_ready",)] == 1
        await wait_until(lambda: health_metrics(monitor)[("bpfpipe_ready",)] == 0, timeout=600)
        samples = health_metrics(monitor)
        assert samples[("bpfpipe_ready",)] == 0
        assert samples[("bpfpipe_health_check_healthy", "programs_loaded", "true")] == 0
        # A cheap check is computed at scrape time.
        source.ring_usage = 0.95
        assert health_metrics(monitor)[("bpfpipe_health_check_healthy", "ringbuf_usage", "false")] == 0
        source.ring_usage = 0.0
        source.program.attachment = None
        await wait_until(lambda: health_metrics(monitor)[("bpfpipe_ready",)] == 1, timeout=600)

        pipe.stop()  # draining: not ready at once
        samples = health_metrics(monitor)
        assert samples[("bpfpipe_ready",)] == 0
        assert samples[("bpfpipe_health_check_healthy", "pipeline", "true")] == 0


async def test_live_answers_from_the_loop() -> None:
    pipe, monitor = build(NodeSpec("src", FakeSource))
    (route,) = [r for r in monitor.routes(pipe) if r.path == "/health/live"]
    response = await route.handler(Request("GET", route.path, {}, {}))
    body = json.loads(response.body)
    assert response.status == 200
    assert body["alive"] is True and body["uptime_s"] >= 0 and isinstance(body["timestamp"], int)


# -- the heartbeat's path ---------------------------------------------------------------------


async def test_heartbeats_skip_process_and_the_sink_and_balance_the_ledger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    RecordsEventNames.seen = []
    pipe, monitor = build(
        NodeSpec("src", FakeSource),
        NodeSpec("sees", RecordsEventNames),
        # N = 1000 at most: every ordinary event may be sampled out, never a heartbeat
        NodeSpec(
            "sampler",
            AdaptiveSampler,
            AdaptiveSamplerConfig(min_sample_rate=1000, max_sample_rate=1000, seed=1),
        ),
        NodeSpec("guarded", CircuitBreakerStage.around(RecordsEventNames, fallback=TestingSink)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(10)
        pipe.stop()
    stats = monitor.statistics()["src"]
    # The last one may have been asked for just before the stop, and never made.
    assert stats.seen >= 10 and stats.sent - stats.seen <= 1
    assert stats.missed == 0 and stats.unexpected == 0
    assert set(RecordsEventNames.seen) == {"fake"}  # process() never saw a heartbeat
    assert all(b.event_name != HEARTBEAT_EVENT for b in sink_of(pipe).batches)
    ledger = pipe.ledger.snapshot()
    assert ledger.total(Outcome.HEARTBEAT) == stats.seen
    assert [(k.stage, k.reason) for k in ledger.outcomes if k.outcome is Outcome.HEARTBEAT] == [
        ("sink", HEARTBEAT_REASON)
    ]
    assert ledger.total(Outcome.USER_SAMPLED_OUT) > 0  # the sampler was sampling meanwhile
    pipe.ledger.check_conserved()


async def test_a_stalled_stage_fails_the_heartbeat_within_its_deadline_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No program: its checks run in a worker thread, and while one runs the autojump
    # clock races ahead (every task is blocked), which would blur the timing checked here.
    pipe, monitor = build(NodeSpec("src", FakeSource, FakeConfig(program=False)), NodeSpec("stall", Stall))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(2)
        assert (await ready(monitor, pipe))[0] == 200
        Stall.released = trio.Event()  # stall from now on
        stalled_at = trio.current_time()
        while (await ready(monitor, pipe))[0] == 200:
            await trio.sleep(0.05)
        failed_after = trio.current_time() - stalled_at
        # The first heartbeat sent after the stall is at most one interval away, and
        # fails once it is older than the deadline.
        interval, deadline = 1.0, 3.0
        assert deadline < failed_after <= interval + deadline + 0.1
        status, body = await ready(monitor, pipe)
        heartbeat = by_name(body)["heartbeat"]
        assert status == 503 and heartbeat["healthy"] is False and heartbeat["critical"] is True
        assert "has not left the last stage" in heartbeat["message"]
        assert "past the 3 s deadline" in heartbeat["message"]
        Stall.released.set()
        await wait_until(lambda: monitor.trackers["src"].outstanding == {}, timeout=5)
        status, body = await ready(monitor, pipe)
        assert status == 200, body
        assert monitor.statistics()["src"].missed == 0  # they were late, not lost
        pipe.stop()
    pipe.ledger.check_conserved()


async def test_synthetic_source_makes_heartbeats(autojump_clock: trio.testing.MockClock) -> None:
    pipe, monitor = build(
        NodeSpec("syn", SyntheticSource, SyntheticConfig(rate_per_s=1000, batch_size=100)),
        config=health_settings(heartbeat_interval_s=0.5),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(5)
        status, body = await ready(monitor, pipe)
        assert status == 200, body
        pipe.stop()
    stats = monitor.statistics()["syn"]
    assert stats.seen >= 9 and stats.missed == 0
    assert stats.last_round_trip_s is not None and stats.last_round_trip_s < 0.01  # no wait for a tick
    assert all(b.event_name == "synthetic" for b in sink_of(pipe).batches)
    pipe.ledger.check_conserved()


async def test_heartbeats_are_off_without_a_health_server(autojump_clock: trio.testing.MockClock) -> None:
    pipe, monitor = build(NodeSpec("src", FakeSource), config=settings(health_check_port=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(3)
        pipe.stop()
    assert monitor.statistics() == {}
    assert pipe.ledger.snapshot().total(Outcome.HEARTBEAT) == 0
