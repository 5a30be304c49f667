"""What a running agent is doing, for people: ``GET /status`` and the admin tap.

``GET /status`` (health server, read-only, never event contents) is the one
document ``bpfpipe diag`` and ``bpfpipe top`` render: programs (LOADED / NOT
LOADED, kernel program ids, attach points, kernel sampling rate), performance,
stages, channels, sampling rates, breaker states, ring usage, the ledger's
totals, version and uptime (since the agent was built). ``?maps=1`` adds every
program's map entries and max entries, counted on the event loop by the program's
``map_usage()`` (batched lookups: milliseconds for a full 65,536-entry hash), so
``diag`` asks for it and ``top`` (every refresh) does not.

``GET /admin/tap?stage=NAME&count=N&timeout_s=S`` (admin server: it shows event
contents) streams up to N live events leaving stage NAME as JSON lines (the
``jsonl`` sink's encoding), then one summary line ``{"_tap": {...}}``.

Theory of operation
-------------------
* **Rates** (events/s, drops/s) are differences of the ledger's cumulative
  totals over a short window: the :meth:`StatusApi.run` helper samples them
  every ``SAMPLE_INTERVAL_S`` into a :class:`RateWindow` holding the last
  ``WINDOW_S``; a request compares *now* with the oldest sample in the window.
  Until a second sample exists the rates are ``null`` (not a made-up zero).
  ``events_per_s`` is what the pipeline took in (the ledger's ``produced``);
  ``drops_per_s`` counts events lost for want of room or dropped by a stage
  (drained, lost on reserve, stage-dropped for any reason but ``filtered``);
  filtering (a stage's deliberate removals) and sampling are reported apart.
* **Latency** is measured by a sink observer, once per batch and without a
  vector operation: ``now - batch.read_time_ns`` weighted by the batch's events
  (all events of a batch left their origin together). The average over the
  window is Δ(sum of latencies) / Δ(events), so it is per event, not per batch.
* **Stage details** come from each node's ``statistics()`` record, recognised by
  shape (:class:`SamplerLike`, :class:`BreakerLike`, :class:`RingLike`): the
  runtime never imports a stage module to describe it.
* **The graph is read at request time** (``pipe.contexts``, ``pipe.edges``, ...):
  a live graph switch replaces those lists, so nothing here caches them.
* **The tap** (:class:`Tap`) is a per-batch hook (``ctx.taps``, or a sink
  observer for the sink). It never blocks and never touches the batch: it
  copies at most the events it still needs into a buffer of at most
  ``max_batches`` batches; when that buffer is full it drops its own copy and
  counts the events (``dropped_copies``, in the summary line). It is removed
  when it has its N events, at its timeout (default 10 s), or when the client
  disconnects — pipeline events are never dropped or delayed by it. Heartbeat
  batches (the health monitor's probes) are not events: the tap skips them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import trio

from . import __version__
from ._batch import Batch
from ._services import HEARTBEAT_EVENT
from .accounting import LedgerSnapshot, Outcome
from .config import Config
from .http import HttpError, Request, Response, Route, json_response
from .ticks import sleep_to_next_tick

if TYPE_CHECKING:
    from ._graph import Pipeline
    from ._stage import StageContext

__all__ = [
    "BreakerLike",
    "LatencyMeter",
    "RateWindow",
    "RingLike",
    "SamplerLike",
    "StatusApi",
    "Tap",
    "Totals",
]

SAMPLE_INTERVAL_S = 1.0
WINDOW_S = 5.0
"""Rates are averaged over (about) this long."""
DEFAULT_TAP_COUNT = 10
MAX_TAP_COUNT = 100_000
DEFAULT_TAP_TIMEOUT_S = 10.0
MAX_TAP_TIMEOUT_S = 3600.0
TAP_BUFFER_BATCHES = 64
"""Batches a tap holds for a slow client before it drops its own copies."""

LOSSES = (Outcome.STAGE_DROPPED, Outcome.DRAINED, Outcome.LOST_ON_RESERVE)
SAMPLED_OUT = (Outcome.KERNEL_SAMPLED_OUT, Outcome.USER_SAMPLED_OUT)
FILTERED = "filtered"
"""The reason a stage's deliberate removals carry: counted apart from drops."""


# -- rates and latency: pure cores ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Totals:
    """Cumulative counts at one moment (what rates are differences of)."""

    produced: int = 0
    delivered: int = 0
    dropped: int = 0
    filtered: int = 0
    sampled_out: int = 0
    latency_sum_ns: int = 0
    latency_events: int = 0

    @classmethod
    def read(cls, ledger: LedgerSnapshot, latency: LatencyMeter) -> Totals:
        delivered = dropped = filtered = sampled = 0
        for key, tally in ledger.outcomes.items():
            if key.outcome is Outcome.DELIVERED:
                delivered += tally.count
            elif key.outcome is Outcome.STAGE_DROPPED and key.reason == FILTERED:
                filtered += tally.count
            elif key.outcome in LOSSES:
                dropped += tally.count
            elif key.outcome in SAMPLED_OUT:
                sampled += tally.count
        return cls(ledger.produced, delivered, dropped, filtered, sampled, latency.sum_ns, latency.events)


class RateWindow:
    """The last ``window_s`` of :class:`Totals` samples, and rates against them."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, Totals]] = deque()

    def add(self, now: float, totals: Totals) -> None:
        self._samples.append((now, totals))
        # Keep one sample at or beyond the window's start, so a request sees a full window.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rates(self, now: float, current: Totals) -> dict[str, float | None]:
        """Per-second rates from the oldest sample to ``current`` (taken at ``now``);
        ``None`` while there is no earlier sample (or no time has passed)."""
        base = next(((t, s) for t, s in self._samples if now - t > 0), None)
        if base is None:
            return {
                "window_s": None,
                "events_per_s": None,
                "delivered_per_s": None,
                "drops_per_s": None,
                "filtered_per_s": None,
                "sampled_out_per_s": None,
                "avg_latency_us": _average_us(current.latency_sum_ns, current.latency_events),
            }
        then, old = base
        dt = now - then
        return {
            "window_s": round(dt, 3),
            "events_per_s": (current.produced - old.produced) / dt,
            "delivered_per_s": (current.delivered - old.delivered) / dt,
            "drops_per_s": (current.dropped - old.dropped) / dt,
            "filtered_per_s": (current.filtered - old.filtered) / dt,
            "sampled_out_per_s": (current.sampled_out - old.sampled_out) / dt,
            "avg_latency_us": _average_us(
                current.latency_sum_ns - old.latency_sum_ns, current.latency_events - old.latency_events
            ),
        }


def _average_us(sum_ns: int, events: int) -> float | None:
    return sum_ns / events / 1000 if events > 0 else None


class LatencyMeter:
    """A sink observer: origin (``read_time_ns``) to sink, summed per event, per batch."""

    def __init__(self, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.sum_ns = 0
        self.events = 0
        self._clock_ns = clock_ns

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch)
        self.sum_ns += max(0, self._clock_ns() - batch.read_time_ns) * n
        self.events += n
        return batch


# -- what stage statistics look like ---------------------------------------------------------


@runtime_checkable
class SamplerLike(Protocol):
    """A sampler's statistics record (``stages.sampler.SamplerStatistics``)."""

    sample_rate: int
    gate_attached: bool


@runtime_checkable
class BreakerLike(Protocol):
    """A circuit breaker's statistics record (``stages.breaker.CircuitBreakerStatistics``)."""

    @property
    def state(self) -> enum.Enum: ...


@runtime_checkable
class RingLike(Protocol):
    """A ring-buffer reader's statistics record (``stages.reader.RingBufferReaderStatistics``)."""

    ring_size_bytes: int
    ring_usage: float
    peak_ring_usage: float
    records_read: int
    records_drained: int


@runtime_checkable
class _HasStatistics(Protocol):
    def statistics(self) -> object: ...


@runtime_checkable
class _Attachment(Protocol):
    function: str
    prog_id: int
    attach_point: str


@runtime_checkable
class ProgramLike(Protocol):
    """What ``/status`` reads of a published BPF program (``bpf.programs.LoadedProgram``)."""

    name: str
    attachments: tuple[_Attachment, ...]

    @property
    def closed(self) -> bool: ...

    @property
    def detached(self) -> bool: ...


def _plain(value: Any) -> Any:
    """A statistics record as JSON-ready data (enums by value, floats finite)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# -- the tap ------------------------------------------------------------------------------


class Tap:
    """A bounded copy of the events leaving one stage; see the module docstring.

    Call it with each batch the stage sends (it is a ``ctx.taps`` hook). The reader
    takes copies with :meth:`take` and waits with :meth:`wait`."""

    def __init__(
        self, count: int, *, max_batches: int = TAP_BUFFER_BATCHES, deadline: float | None = None
    ) -> None:
        if count < 1 or max_batches < 1:
            raise ValueError("a tap needs count >= 1 and max_batches >= 1")
        self.count = count
        self.max_batches = max_batches
        self.deadline = deadline
        """trio time past which the hook does nothing, even if nobody unhooked it."""
        self.copied = 0
        """Events copied into the buffer so far (taken or not)."""
        self.dropped_copies = 0
        """Events the tap wanted while its buffer was full: its own copies, not the pipeline's."""
        self.closed = False
        self._buffer: deque[Batch] = deque()
        self._wakeup = trio.Event()

    @property
    def complete(self) -> bool:
        """It has copied every event it wants."""
        return self.copied >= self.count

    def __call__(self, batch: Batch) -> None:
        need = self.count - self.copied
        if self.closed or need <= 0 or len(batch) == 0 or batch.event_name == HEARTBEAT_EVENT:
            return
        if self.deadline is not None and trio.current_time() > self.deadline:
            self.close()
            return
        take = min(need, len(batch))
        if len(self._buffer) >= self.max_batches:
            self.dropped_copies += take
            return
        self._buffer.append(
            Batch(
                batch.events[:take].copy(),
                batch.weights[:take].copy(),
                source=batch.source,
                seq=batch.seq,
                read_time_ns=batch.read_time_ns,
                event_name=batch.event_name,
            )
        )
        self.copied += take
        self._wakeup.set()

    def observe(self, batch: Batch) -> Batch:
        """The same, as a sink observer (passes the batch on untouched)."""
        self(batch)
        return batch

    def take(self) -> Batch | None:
        return self._buffer.popleft() if self._buffer else None

    async def wait(self) -> None:
        """Until a copy is buffered (returns at once if one is)."""
        while not self._buffer:
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()


def _number(request: Request, name: str, default: float, low: float, high: float, kind: type) -> Any:
    text = request.arg(name)
    if text is None:
        return kind(default)
    try:
        value = kind(text)
    except ValueError:
        raise HttpError(400, f"{name}: expected a number, got {text!r}") from None
    if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
        raise HttpError(400, f"{name}: must be in {kind(low)}..{kind(high)}, got {text}")
    return value


# -- the API ------------------------------------------------------------------------------


class StatusApi:
    """``/status`` (health server) and ``/admin/tap`` (admin server) for one pipeline."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.monotonic()
        self.latency = LatencyMeter()
        self.window = RateWindow()
        self._observed: Pipeline | None = None
        self.active_taps = 0

    def attach(self, pipe: Pipeline) -> None:
        """Measure latency at ``pipe``'s sink (idempotent)."""
        if self._observed is not pipe:
            self._observed = pipe
            pipe.sink_observers.append(self.latency)

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A pipeline helper: sample the totals every ``SAMPLE_INTERVAL_S`` for the rates."""
        self.attach(pipe)
        task_status.started()
        while True:
            self.sample(pipe)
            await sleep_to_next_tick(SAMPLE_INTERVAL_S)

    def sample(self, pipe: Pipeline) -> None:
        self.window.add(time.monotonic(), Totals.read(pipe.ledger.snapshot(), self.latency))

    def routes(self, pipe: Pipeline) -> list[Route]:
        self.attach(pipe)

        async def status(request: Request) -> Response:
            return json_response(self.document(pipe, maps=request.arg("maps", "0") in {"1", "true", "yes"}))

        return [Route("GET", "/status", status)]

    def admin_routes(self, pipe: Pipeline) -> list[Route]:
        async def tap(request: Request) -> Response:
            return self.open_tap(pipe, request)

        return [Route("GET", "/admin/tap", tap)]

    # -- the document -----------------------------------------------------------------------
    def document(self, pipe: Pipeline, *, maps: bool = False) -> dict[str, Any]:
        """Everything ``diag`` and ``top`` show (see the module docstring)."""
        stats = pipe.statistics()
        now = time.monotonic()
        stages: list[dict[str, Any]] = []
        sampling_user: list[dict[str, Any]] = []
        breakers: list[dict[str, Any]] = []
        rings: list[dict[str, Any]] = []
        # By name: while a graph switch drains the old chain, its stages are listed after
        # the current ones (their nodes are not ours to ask: no details for them).
        nodes = {ctx.name: node for ctx, node in zip(pipe.contexts, pipe.nodes, strict=False)}
        for s in stats.stages:
            node = nodes.get(s.name)
            entry: dict[str, Any] = {**s.summary(), "last_error": s.last_error}
            record = node.statistics() if isinstance(node, _HasStatistics) else None
            if record is not None:
                entry["details"] = _plain(record)
            if isinstance(record, SamplerLike):
                sampling_user.append(
                    {
                        "stage": s.name,
                        "sample_rate": record.sample_rate,
                        "gate_attached": record.gate_attached,
                    }
                )
            if isinstance(record, BreakerLike):
                breakers.append({"stage": s.name, "state": _plain(record.state)})
            if isinstance(record, RingLike):
                program = getattr(node, "program", None)
                rings.append(
                    {
                        "stage": s.name,
                        "program": getattr(program, "name", ""),
                        "ring_size_bytes": record.ring_size_bytes,
                        "ring_usage": record.ring_usage,
                        "peak_ring_usage": record.peak_ring_usage,
                        "records_read": record.records_read,
                        "records_drained": record.records_drained,
                    }
                )
            stages.append(entry)
        programs = [self._program(p, maps=maps) for p in _programs(pipe)]
        return {
            "version": __version__,
            "uptime_s": round(now - self.started_at, 3),
            "state": "stopping" if pipe.stopping else "running" if pipe.started else "starting",
            "programs": programs,
            "maps": [m for p in programs for m in p.get("maps", ())] if maps else None,
            "performance": self.window.rates(now, Totals.read(stats.ledger, self.latency)),
            "stages": stages,
            "channels": [
                {
                    "name": e.name,
                    "depth": e.depth,
                    "capacity": e.capacity,
                    "peak_depth": e.peak_depth,
                    "queued_events": e.queued_events,
                }
                for e in stats.edges
            ],
            "sampling": {
                "user": sampling_user,
                "kernel": [
                    {"program": p["name"], "sample_rate": p["sample_rate"]}
                    for p in programs
                    if p["sample_rate"] is not None
                ],
            },
            "breakers": breakers,
            "rings": rings,
            "inflight": {
                "events": stats.budget.events,
                "bytes": stats.budget.bytes,
                "max_events": stats.budget.max_events,
                "max_bytes": stats.budget.max_bytes,
            },
            "accounting": {
                "produced": stats.ledger.produced,
                "pending": stats.ledger.pending,
                "outcomes": stats.ledger.by_outcome(),
            },
            "taps": self.active_taps,
        }

    @staticmethod
    def _program(program: ProgramLike, *, maps: bool) -> dict[str, Any]:
        loaded = not program.closed and not program.detached
        entry: dict[str, Any] = {
            "name": program.name,
            "state": "LOADED" if loaded else "NOT LOADED",
            "ids": [a.prog_id for a in program.attachments],
            "attachments": [
                {"function": a.function, "prog_id": a.prog_id, "attach_point": a.attach_point}
                for a in program.attachments
            ],
            "sample_rate": None,
        }
        if not program.closed:
            sample_rate = getattr(program, "sample_rate", None)
            if callable(sample_rate):
                try:
                    entry["sample_rate"] = int(sample_rate())
                except Exception as exc:  # a map that went away: say so, do not fail the page
                    entry["error"] = f"sample rate: {type(exc).__name__}: {exc}"
        if maps:
            entry["maps"] = _map_usage(program)
        return entry

    # -- the tap ----------------------------------------------------------------------------
    def open_tap(self, pipe: Pipeline, request: Request) -> Response:
        name = request.arg("stage")
        contexts = list(pipe.contexts)  # read now: a graph switch replaces the list
        names = [c.name for c in contexts]
        if not name:
            raise HttpError(400, f"stage: required (stages: {', '.join(names)})")
        ctx = next((c for c in contexts if c.name == name), None)
        if ctx is None:
            raise HttpError(404, f"no stage {name!r} (stages: {', '.join(names)})")
        count = _number(request, "count", DEFAULT_TAP_COUNT, 1, MAX_TAP_COUNT, int)
        timeout_s = _number(request, "timeout_s", DEFAULT_TAP_TIMEOUT_S, 0.001, MAX_TAP_TIMEOUT_S, float)
        deadline = trio.current_time() + timeout_s
        # A grace period on the hook's own deadline: the stream unhooks it first, unless
        # the server never got to run the stream at all.
        tap = Tap(count, deadline=deadline + 1.0)
        stream = _TapStream(tap, name, deadline, request.receive)
        stream.close = self._closer(tap, _install(pipe, ctx, tap))
        self.active_taps += 1
        return Response(200, content_type="application/x-ndjson", stream=stream)

    def _closer(self, tap: Tap, remove: Callable[[], None]) -> Callable[[], None]:
        done = False

        def close() -> None:
            nonlocal done
            if not done:
                done = True
                tap.close()
                remove()
                self.active_taps -= 1

        return close


def _programs(pipe: Pipeline) -> list[ProgramLike]:
    return [p for p in pipe.services.published_programs() if isinstance(p, ProgramLike)]


def _map_usage(program: ProgramLike) -> list[dict[str, Any]]:
    """Entries and max entries of a program's maps. Uses the program's own
    ``map_usage()`` when it has one; else its growing maps' counts, sized by
    ``map_size``. The walk of a hash map's keys is why ``top`` does not ask."""
    if program.closed:
        return []
    own = getattr(program, "map_usage", None)
    try:
        if callable(own):
            usage: Mapping[str, tuple[int, int]] = own()
            return [
                {"program": program.name, "name": name, "entries": entries, "max_entries": max_entries}
                for name, (entries, max_entries) in usage.items()
            ]
        growing = getattr(program, "growing_maps", None)
        if not callable(growing):
            return []
        size = getattr(program, "map_size", None)
        return [
            {"program": program.name, "name": name, "entries": int(entries), "max_entries": size}
            for name, entries in growing().items()
        ]
    except Exception as exc:  # one unreadable map must not take the page down
        return [{"program": program.name, "name": "?", "error": f"{type(exc).__name__}: {exc}"}]


def _install(pipe: Pipeline, ctx: StageContext, tap: Tap) -> Callable[[], None]:
    """Hook ``tap`` after ``ctx``'s stage (for the sink: before it receives); returns
    the function that unhooks it."""
    if ctx.stats.kind == "sink":
        observers = pipe.sink_observers
        observer = tap.observe
        observers[:] = [o for o in observers if not _stale(o)]
        observers.append(observer)

        def remove_observer() -> None:
            if observer in observers:
                observers.remove(observer)

        return remove_observer
    taps = ctx.taps
    taps[:] = [t for t in taps if not _stale(t)]
    taps.append(tap)

    def remove_tap() -> None:
        if tap in taps:
            taps.remove(tap)

    return remove_tap


def _stale(hook: object) -> bool:
    """A closed tap's hook (``Tap`` or its bound ``observe``), left behind by a
    response whose stream never ran: swept when the next tap is installed."""
    owner = getattr(hook, "__self__", hook)
    return isinstance(owner, Tap) and owner.closed


class _TapStream:
    """The tap's response body: JSON lines of its copies, then the summary line."""

    def __init__(
        self,
        tap: Tap,
        stage: str,
        deadline: float,
        receive: Callable[[], Awaitable[Mapping[str, Any]]] | None,
    ) -> None:
        from stages.jsonl_sink import JsonLinesEncoder  # the jsonl sink's encoding, byte for byte

        self.tap = tap
        self.stage = stage
        self.deadline = deadline
        self.receive = receive
        self.close: Callable[[], None] = tap.close
        self.encoder = JsonLinesEncoder()
        self.sent = 0
        self.ended: str | None = None
        self.finished = False

    async def __call__(self) -> bytes | None:
        try:
            return await self._next()
        except BaseException:
            self.close()  # cancelled (server stopping, client gone) or a bug: unhook first
            raise

    async def _next(self) -> bytes | None:
        if self.finished:
            return None
        tap = self.tap
        batch = tap.take()
        if batch is None and self.ended is None and not tap.complete:
            batch = await self._wait()
        if batch is not None:
            self.sent += len(batch)
            return self.encoder.encode(batch.events, batch.weights, batch.event_name)
        self.close()
        self.finished = True
        summary = {
            "stage": self.stage,
            "events": self.sent,
            "dropped_copies": tap.dropped_copies,
            "ended": self.ended or "count",
        }
        return json_response({"_tap": summary}).body

    async def _wait(self) -> Batch | None:
        with trio.move_on_at(self.deadline):
            async with trio.open_nursery() as nursery:
                if self.receive is not None:
                    nursery.start_soon(self._watch_disconnect, nursery.cancel_scope)
                await self.tap.wait()
                nursery.cancel_scope.cancel()
        batch = self.tap.take()
        if batch is None and self.ended is None:
            self.ended = "timeout"
        return batch

    async def _watch_disconnect(self, scope: trio.CancelScope) -> None:
        assert self.receive is not None
        while True:
            message = await self.receive()
            if message.get("type") == "http.disconnect":
                self.ended = "client gone"
                scope.cancel()
                return
