"""Health checks and the end-to-end heartbeat (issue #8): ``/health/live`` and ``/health/ready``.

Theory of operation
-------------------
``/health/live`` is answered by a handler on the trio loop, so an answer at all
means the process and its event loop are responsive.

``/health/ready`` runs the checks below and answers
``{"healthy": bool, "details": [{"name", "healthy", "critical", "message"}],
"timestamp": <ms since the epoch>}``: HTTP 200 when every *critical* check passes,
503 otherwise (a failed non-critical check shows in ``details`` and ``healthy``
stays true). ``healthy`` is exactly "no critical check failed".

The checks, in this order (``critical``: does a failure make it 503):

* ``pipeline`` (critical): every node and helper has started and no stop was asked
  for; readiness turns 503 the moment draining starts (``Pipeline.stopping``).
* ``programs_loaded`` (critical): every published :class:`pipeline.ProgramHealth`
  has each attachment in place (an XDP program detached from outside fails it).
* ``maps_accessible`` (critical): every such program's maps are open and its
  counters answer a lookup through their fd.
* ``ringbuf_usage``: every ring-buffer reader's ring is below
  ``health.ringbuf_usage_limit_percent``.
* ``event_processing``: the source read events (heartbeats not counted) over the
  last one to two ``health.heartbeat_interval_s``; an idle machine may have none.
* ``heartbeat`` (critical): every heartbeat source's newest heartbeat was seen
  leaving the last stage, and none has been unseen for longer than
  ``health.heartbeat_deadline_s``.

While draining, the program checks are not run (detaching and closing the
programs is what a stop does) and say so.

A source without programs (the synthetic one) reports the program checks and
the ring check as "not applicable", healthy; a source that makes no heartbeats
does the same for the heartbeat check.

The heartbeat is critical because "ready" is meant to promise that events flow:
every ``health.heartbeat_interval_s`` the monitor asks each
:class:`pipeline.HeartbeatSource` for a heartbeat carrying a fresh *marker*. A BPF
source makes it in the kernel (bpfpipe.h: a tracepoint on a syscall the agent
makes), so it travels the whole way real events do — ring buffer, reader, decoder,
every stage (``BatchStage`` passes it untouched, samplers never sample it) — and a
sink observer (``Pipeline.sink_observers``) takes it off right before the sink:
never delivered, recorded as ``Outcome.HEARTBEAT`` so the ledger still balances.
Readiness is therefore 503 until the first heartbeat has made the trip. When a
heartbeat is seen, every older one still unseen is given up (lost in a full ring,
or drained: the ledger says which) and counted as missed; the check fails while
the oldest unseen heartbeat is older than the deadline, and recovers as soon as a
newer one is seen. Heartbeats run while the health server is on
(``health_check_port`` != 0); with it off, nothing would read them.

Thresholds are read from ``self.config`` at each check, so :meth:`HealthMonitor.update`
changes them live (a new interval applies at once).

The same checks are metrics (:meth:`HealthMonitor.collect`, registered in the
agent's Prometheus registry): ``bpfpipe_ready`` (1 when ``/health/ready`` would say
200) and ``bpfpipe_health_check_healthy{check, critical}``. The cheap checks are
computed at scrape time; the two program checks (which may ask iproute2 or the
kernel) are taken from the last run, made every ``health.heartbeat_interval_s``
while the metrics server is on, and at every ``/health/ready``.

The pure cores, :class:`HeartbeatTracker` and :func:`readiness`, take the time as an
argument and know nothing of trio or HTTP.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import trio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ._services import HEARTBEAT_EVENT, HeartbeatSource, ProgramHealth
from .accounting import Outcome
from .config import Config
from .http import Request, Response, Route, json_response
from .ticks import next_tick, sleep_to_next_tick

if TYPE_CHECKING:
    from ._batch import Batch
    from ._graph import Pipeline

__all__ = [
    "HEARTBEAT_REASON",
    "CheckResult",
    "HealthMonitor",
    "HeartbeatStatistics",
    "HeartbeatTracker",
    "Readiness",
    "RingUsageReporter",
    "readiness",
]

NOT_APPLICABLE = "not applicable"
HEARTBEAT_REASON = "consumed by the health monitor"
"""The reason recorded with ``Outcome.HEARTBEAT``."""
MARKER_MODULUS = 1 << 31
"""Markers are 0 <= m < 2**31 (a BPF source passes them as a syscall's C int)."""


# -- the pure cores ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    healthy: bool
    critical: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "healthy": self.healthy,
            "critical": self.critical,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Readiness:
    healthy: bool
    """No critical check failed."""
    details: tuple[CheckResult, ...]
    timestamp_ms: int

    @property
    def status(self) -> int:
        return 200 if self.healthy else 503

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "details": [c.as_dict() for c in self.details],
            "timestamp": self.timestamp_ms,
        }


def readiness(checks: Sequence[CheckResult], *, timestamp_ms: int) -> Readiness:
    """Ready unless a critical check failed (non-critical failures only show)."""
    healthy = all(c.healthy for c in checks if c.critical)
    return Readiness(healthy, tuple(checks), timestamp_ms)


@dataclass(frozen=True, slots=True)
class HeartbeatStatistics:
    sent: int
    seen: int
    missed: int
    """Given up: a newer heartbeat was seen first (lost or drained on the way)."""
    unexpected: int
    """Heartbeat events carrying no marker this tracker is waiting for."""
    last_round_trip_s: float | None
    """Sent -> seen leaving the last stage, for the newest heartbeat seen."""


@dataclass
class HeartbeatTracker:
    """Heartbeats of one source: which were sent when, which came back (pure)."""

    outstanding: dict[int, float] = field(default_factory=dict)
    """Marker -> when it was sent; oldest first."""
    sent: int = 0
    seen: int = 0
    missed: int = 0
    unexpected: int = 0
    last_sent_at: float | None = None
    last_seen_at: float | None = None
    last_round_trip_s: float | None = None

    def on_sent(self, marker: int, now: float) -> None:
        self.outstanding[marker] = now
        self.sent += 1
        self.last_sent_at = now

    def on_seen(self, marker: int, now: float) -> bool:
        """A heartbeat left the last stage; False if it was not one we wait for."""
        sent_at = self.outstanding.get(marker)
        if sent_at is None:
            self.unexpected += 1
            return False
        for older in list(self.outstanding):  # oldest first: up to and including marker
            del self.outstanding[older]
            if older == marker:
                break
            self.missed += 1
        self.seen += 1
        self.last_seen_at = now
        self.last_round_trip_s = now - sent_at
        return True

    def check(self, now: float, deadline_s: float) -> tuple[bool, str]:
        """(healthy, message) of this source's heartbeat at ``now``."""
        if self.last_sent_at is None:
            return False, "no heartbeat sent yet"
        if self.outstanding:
            marker, sent_at = next(iter(self.outstanding.items()))
            age = now - sent_at
            if age > deadline_s:
                seen = (
                    "none seen yet"
                    if self.last_seen_at is None
                    else f"last one seen {now - self.last_seen_at:.1f} s ago"
                )
                return False, (
                    f"heartbeat {marker} sent {age:.1f} s ago has not left the last stage: "
                    f"{age - deadline_s:.1f} s past the {deadline_s:g} s deadline ({seen})"
                )
        if self.last_seen_at is None:
            return False, f"waiting for the first heartbeat (sent {now - self.last_sent_at:.1f} s ago)"
        assert self.last_round_trip_s is not None
        return True, (
            f"last heartbeat left the last stage {now - self.last_seen_at:.1f} s ago, "
            f"round trip {self.last_round_trip_s * 1000:.1f} ms"
        )

    def statistics(self) -> HeartbeatStatistics:
        return HeartbeatStatistics(self.sent, self.seen, self.missed, self.unexpected, self.last_round_trip_s)


# -- the shell -----------------------------------------------------------------------------


@runtime_checkable
class RingUsageReporter(Protocol):
    """A source reading a ring buffer (``stages.reader.RingBufferReader``)."""

    @property
    def ring_usage(self) -> float:
        """Fraction of the ring in use when last looked at."""


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    events: int


class HealthMonitor(Collector):
    """``/health/live``, ``/health/ready``, the heartbeat and the health metrics; see
    the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.trackers: dict[str, HeartbeatTracker] = {}
        """Source name -> its heartbeats."""
        self._started_monotonic = time.monotonic()
        self._next_marker = secrets.randbelow(MARKER_MODULUS)
        self._wake = trio.Event()
        self._samples: list[_Sample] = []
        self._pipe: Pipeline | None = None
        self._program_checks: list[CheckResult] | None = None
        """The last run of programs_loaded and maps_accessible (None: not run yet)."""

    @property
    def heartbeats_enabled(self) -> bool:
        return self.config.health_check_port != 0

    def update(self, config: Config) -> None:
        """Take new ``health.*`` thresholds (live reload); a new interval applies at once."""
        self.config = config
        self._wake.set()

    def statistics(self) -> dict[str, HeartbeatStatistics]:
        """Heartbeat counts by source name."""
        return {name: t.statistics() for name, t in self.trackers.items()}

    # -- HTTP --------------------------------------------------------------------------
    def routes(self, pipe: Pipeline) -> list[Route]:
        async def live(request: Request) -> Response:
            return json_response(
                {
                    "alive": True,
                    "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
                    "timestamp": int(time.time() * 1000),
                }
            )

        async def ready(request: Request) -> Response:
            result = await self.check(pipe)
            return json_response(result.as_dict(), result.status)

        return [Route("GET", "/health/live", live), Route("GET", "/health/ready", ready)]

    # -- the checks --------------------------------------------------------------------
    async def check(self, pipe: Pipeline) -> Readiness:
        """Run every check now (the program checks in a worker thread: they may ask
        iproute2 or the kernel)."""
        program_checks = await self._run_program_checks(pipe)
        return readiness(self._checks(pipe, program_checks), timestamp_ms=int(time.time() * 1000))

    async def _run_program_checks(self, pipe: Pipeline) -> list[CheckResult]:
        programs = list(pipe.services.checked_programs())
        if pipe.stopping:
            checks = _draining_program_checks()
        elif programs:
            checks = await trio.to_thread.run_sync(_check_programs, programs)
        else:
            checks = _check_programs(programs)
        self._program_checks = checks
        return checks

    def _checks(self, pipe: Pipeline, program_checks: list[CheckResult]) -> list[CheckResult]:
        if pipe.stopping:  # detaching and closing them is what a stop does: not a fault
            program_checks = _draining_program_checks()
        now = trio.current_time()
        return [
            self._check_pipeline(pipe),
            *program_checks,
            self._check_ring(pipe),
            self._check_rate(pipe, now),
            self._check_heartbeat(pipe, now),
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """``bpfpipe_ready`` and ``bpfpipe_health_check_healthy`` (a Prometheus collector;
        called at scrape time on the trio loop)."""
        ready = GaugeMetricFamily(
            "bpfpipe_ready", "1 when /health/ready answers 200 (no critical check failing), else 0"
        )
        per_check = GaugeMetricFamily(
            "bpfpipe_health_check_healthy",
            "Each readiness check: 1 passing (or not applicable), 0 failing",
            labels=["check", "critical"],
        )
        pipe = self._pipe
        try:
            trio.current_time()
        except RuntimeError:  # a snapshot from outside the loop (the run is over)
            pipe = None
        if pipe is None:  # not running: not ready, and no check to show
            ready.add_metric([], 0)
            yield ready
            return
        program_checks = self._program_checks
        if program_checks is None:
            program_checks = [
                CheckResult(name, False, True, "not checked yet")
                for name in ("programs_loaded", "maps_accessible")
            ]
        result = readiness(self._checks(pipe, program_checks), timestamp_ms=0)
        ready.add_metric([], 1 if result.healthy else 0)
        for check in result.details:
            per_check.add_metric(
                [check.name, "true" if check.critical else "false"], 1 if check.healthy else 0
            )
        yield ready
        yield per_check

    @staticmethod
    def _check_pipeline(pipe: Pipeline) -> CheckResult:
        if pipe.stopping:
            return CheckResult("pipeline", False, True, "draining: a stop was requested")
        if not pipe.started:
            return CheckResult("pipeline", False, True, "starting")
        return CheckResult("pipeline", True, True, "running")

    def _check_ring(self, pipe: Pipeline) -> CheckResult:
        limit = self.config.health.ringbuf_usage_limit_percent
        readers = [
            (ctx.name, node.ring_usage * 100)
            for node, ctx in zip(pipe.nodes, pipe.contexts, strict=True)
            if isinstance(node, RingUsageReporter)
        ]
        if not readers:
            return CheckResult("ringbuf_usage", True, False, f"{NOT_APPLICABLE}: no ring buffer")
        over = [f"{name} {pct:.1f} %" for name, pct in readers if pct >= limit]
        if over:
            return CheckResult("ringbuf_usage", False, False, f"at or over {limit:g} %: {', '.join(over)}")
        usage = ", ".join(f"{name} {pct:.1f} %" for name, pct in readers)
        return CheckResult("ringbuf_usage", True, False, f"below {limit:g} %: {usage}")

    def _source_events(self, pipe: Pipeline) -> int:
        """Events the source produced, heartbeats left out."""
        heartbeats = sum(t.sent for t in self.trackers.values())
        return max(0, pipe.contexts[0].stats.produced_events - heartbeats)

    def _sample(self, pipe: Pipeline, now: float) -> None:
        """Keep the last two samples of the source's count, one interval apart or more."""
        if self._samples and now - self._samples[-1].at < self.config.health.heartbeat_interval_s:
            return
        self._samples = [*self._samples[-1:], _Sample(now, self._source_events(pipe))]

    def _check_rate(self, pipe: Pipeline, now: float) -> CheckResult:
        if not self._samples:
            return CheckResult("event_processing", False, False, "no rate measured yet")
        first = self._samples[0]
        window = now - first.at
        events = self._source_events(pipe) - first.events
        if window <= 0 or events <= 0:
            return CheckResult("event_processing", False, False, f"no events in the last {window:.1f} s")
        return CheckResult(
            "event_processing", True, False, f"{events / window:.1f} events/s over the last {window:.1f} s"
        )

    def _check_heartbeat(self, pipe: Pipeline, now: float) -> CheckResult:
        names = [pipe.contexts[p.node].name for p in pipe.services.heartbeat_sources]
        if not names:
            return CheckResult("heartbeat", True, True, f"{NOT_APPLICABLE}: the source makes no heartbeats")
        if not self.heartbeats_enabled:
            return CheckResult("heartbeat", True, True, f"{NOT_APPLICABLE}: heartbeats are off")
        deadline = self.config.health.heartbeat_deadline_s
        results = [
            (name, *self.trackers.get(name, HeartbeatTracker()).check(now, deadline)) for name in names
        ]
        healthy = all(ok for _, ok, _ in results)
        if len(results) == 1:
            message = results[0][2]
        else:
            message = "; ".join(f"{name}: {text}" for name, _, text in results)
        return CheckResult("heartbeat", healthy, True, message)

    # -- the heartbeat -----------------------------------------------------------------
    def observe(self, batch: Batch) -> Batch | None:
        """The sink observer: consume heartbeat batches (``Outcome.HEARTBEAT``), pass the rest."""
        if batch.event_name != HEARTBEAT_EVENT:
            return batch
        pipe = self._pipe
        assert pipe is not None
        now = trio.current_time()
        tracker = self.trackers.setdefault(batch.source, HeartbeatTracker())
        events = batch.events
        names = events.dtype.names or ()
        markers = events["marker"].tolist() if "marker" in names else []
        tgids = events["tgid"].tolist() if "tgid" in names else [os.getpid()] * len(markers)
        pid = os.getpid()
        for marker, tgid in zip(markers, tgids, strict=True):
            if tgid == pid:
                tracker.on_seen(int(marker), now)
            else:
                tracker.unexpected += 1
        tracker.unexpected += len(batch) - len(markers)
        pipe.contexts[-1].record(Outcome.HEARTBEAT, len(batch), batch.weight_sum, reason=HEARTBEAT_REASON)
        return None

    def beat(self, pipe: Pipeline) -> None:
        """Ask every heartbeat source for one heartbeat now."""
        now = trio.current_time()
        for published in pipe.services.heartbeat_sources:
            source = published.service
            assert isinstance(source, HeartbeatSource)
            name = pipe.contexts[published.node].name
            marker = self._next_marker
            self._next_marker = (marker + 1) % MARKER_MODULUS
            try:
                source.trigger_heartbeat(marker)
            except Exception as exc:
                pipe.contexts[published.node].error(exc, "trigger_heartbeat()")
                continue
            self.trackers.setdefault(name, HeartbeatTracker()).on_sent(marker, now)

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A pipeline helper: intercept heartbeats before the sink and make one every
        ``health.heartbeat_interval_s`` (while heartbeats are on and no stop was asked)."""
        self._pipe = pipe
        pipe.sink_observers.append(self.observe)
        self._sample(pipe, trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh_program_checks, pipe)
            task_status.started()
            await self._beat_forever(pipe)

    async def _refresh_program_checks(self, pipe: Pipeline) -> None:
        """For the metrics: run the program checks once per ``health.heartbeat_interval_s``
        while there is a metrics server to scrape them (an XDP check runs iproute2)."""
        while True:
            if pipe.started and self.config.metrics_port != 0:
                await self._run_program_checks(pipe)
            await sleep_to_next_tick(self.config.health.heartbeat_interval_s)

    async def _beat_forever(self, pipe: Pipeline) -> None:
        while True:
            if self.heartbeats_enabled and not pipe.stopping:
                self.beat(pipe)
            with trio.move_on_at(next_tick(trio.current_time(), self.config.health.heartbeat_interval_s)):
                await self._wake.wait()
            self._wake = trio.Event()
            self._sample(pipe, trio.current_time())


def _draining_program_checks() -> list[CheckResult]:
    return [
        CheckResult(name, True, True, "not checked: the pipeline is draining")
        for name in ("programs_loaded", "maps_accessible")
    ]


def _check_programs(programs: Sequence[ProgramHealth]) -> list[CheckResult]:
    """programs_loaded and maps_accessible (blocking: run in a worker thread)."""
    if not programs:
        return [
            CheckResult("programs_loaded", True, True, f"{NOT_APPLICABLE}: the source loads no BPF program"),
            CheckResult("maps_accessible", True, True, f"{NOT_APPLICABLE}: the source loads no BPF program"),
        ]
    names = ", ".join(p.name for p in programs)
    results = []
    for check, ok_message in (
        ("programs_loaded", "loaded and attached"),
        ("maps_accessible", "answer a lookup"),
    ):
        problems = []
        for program in programs:
            try:
                if check == "programs_loaded":
                    problem = program.attachment_problem()
                else:
                    problem = program.maps_problem()
            except Exception as exc:  # a check that breaks is a failed check, not a 500
                problem = f"{program.name}: {type(exc).__name__}: {exc}"
            if problem is not None:
                problems.append(problem)
        message = "; ".join(problems) if problems else f"{names}: {ok_message}"
        results.append(CheckResult(check, not problems, True, message))
    return results
