"""Prometheus metrics: the seed's ``bpf_*`` names and the pipeline's ``bpfpipe_*``.

:class:`MetricsExporter` owns one :class:`~prometheus_client.CollectorRegistry`
(never the global one) and serves it as ``GET /metrics`` on the metrics server.
``snapshot_text(pipe)`` is the same exposition as a string (written at shutdown).

Theory of operation
-------------------
* **Pulled at scrape time.** Almost everything is read when Prometheus scrapes,
  by one custom collector, from the records the runtime already keeps:
  ``pipe.statistics()`` (stages, channels, in-flight budget, ledger), each node's
  ``statistics()`` recognised by shape (reader, sampler, breaker: the runtime
  never imports a stage module), the enforcer's ``counts`` and the BPF programs
  the sources published (``pipe.services``). The hot path pays nothing for them.
* **Kernel side** (the seed's names): for every published program, its per-CPU
  ``bpfpipe_stats`` summed over CPUs (``kernel_stats()``): STAT_PROCESSED and
  STAT_DROPPED as ``bpf_packets_processed_total`` / ``bpf_packets_dropped_total``
  (XDP programs only: for a tracepoint program they are not packets), STAT_ERRORS
  and STAT_LOST_RESERVE in ``bpf_errors_total``; the entries of its hash-like maps
  (``map_usage()``, one batch-lookup syscall per map); its in-kernel timing
  histogram (``latency_histogram()``). A program that has been closed reports
  the values last read from it (so the shutdown snapshot still has them: the
  reader reads the final counters after detaching, before closing). A scrape
  runs on the event loop: with a full 65,536-entry map it takes ~6.5 ms
  (``bench/metrics.py``), ~6 ms of it counting that map.
* **bpf_processing_latency_ns** is the XDP program's own bucketed histogram
  (buckets 100, 500, 1000, 5000, 10000 ns, +Inf), made cumulative. The kernel
  counts packets per bucket and does not sum nanoseconds, so there is **no
  ``_sum`` sample**: exporting one would be invented. ``_count`` is exported
  (it is the +Inf bucket); ``histogram_quantile()`` works on the buckets.
  ``promtool check metrics`` reports one lint finding, on this name ("should not
  contain abbreviated units"): the seed fixes it; everything else is lint-clean.
* **Per batch, vectorised**: the end-to-end latency, kernel timestamp (``ts_ns``,
  ``bpf_ktime_get_ns``, CLOCK_MONOTONIC) to the sink, is observed by a sink
  observer against ``time.monotonic_ns()``, exactly per event but without an
  array of ages: a min, a max and a sum of the batch's stamps, plus one
  ``count_nonzero`` per bucket bound the batch straddles
  (:meth:`LatencyHistogram.observe_ages`). It is exported in **seconds** (Prometheus base unit)
  as ``bpfpipe_end_to_end_latency_seconds``, although the issue says
  milliseconds. Batches without an integer ``ts_ns`` column (or ``hdr.ts_ns``)
  are not observed. Each event is one observation (not weighted by sampling).
* **enhanced_metrics** (``exporter.enhanced``, initially
  ``feature_flags.enhanced_metrics``; a plain attribute the reload path may flip
  live): when on, ``bpfpipe_stage_processing_seconds{stage}`` times each call of
  a per-batch stage's ``process()`` (``BatchStage``: ``time.perf_counter_ns``
  around the call only, so channel waits are excluded; one observation per
  batch; stages with their own ``run`` loop are not timed), and
  ``bpfpipe_events_by_type_total{event}`` counts the events reaching the sink
  by the batch's ``event_name`` (or its ``type`` column). Off, neither family is
  exported and the hooks cost one attribute test per batch; what was counted
  while on is kept, so a flip back on continues the counters.
* **Reload**: ``exporter.reload_statistics`` (a callable returning a record with
  ``version``, ``failures``, ``last_reload_unix``; None: version 1, no
  failures, no timestamp) feeds ``bpfpipe_config_*``.
* **Health**: ``build_agent`` registers the health monitor in the same registry
  (``bpfpipe_ready``, ``bpfpipe_health_check_healthy{check, critical}``; see
  :mod:`pipeline.health`).

``attach(pipe)`` installs the per-batch hooks; ``build_agent`` calls it before
the pipeline starts (so no batch passes unobserved and ``process()`` can be
wrapped before a stage's loop binds it); ``routes`` and ``run`` call it too.
Stages a live graph switch starts are timed only if ``attach`` runs again
before they start. Cost (``bench/metrics.py``, synthetic → 4 noop → null at
batch 1024, the worst case: stages that do nothing): ~7-8 µs per batch with the
exporter, ~11 µs with ``enhanced`` on, against ~75 µs per batch without.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from . import __version__
from ._batch import Batch
from ._stage import BatchStage
from .breaker import BreakerState, BreakerStatistics
from .config import Config
from .http import Request, Response, Route
from .ring_accounting import KernelCounters

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = [
    "END_TO_END_BUCKETS_S",
    "KERNEL_LATENCY_BUCKETS_NS",
    "STAGE_TIME_BUCKETS_S",
    "LatencyHistogram",
    "MetricsExporter",
]

log = logging.getLogger("bpfpipe.metrics")

KERNEL_LATENCY_BUCKETS_NS: tuple[int, ...] = (100, 500, 1000, 5000, 10000)
"""The seed's buckets of ``bpf_processing_latency_ns`` (the XDP program's latency_hist rows)."""
END_TO_END_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Kernel timestamp → sink: the reader's latency budget is 100 ms by default, so the range centres there."""
STAGE_TIME_BUCKETS_S: tuple[float, ...] = (
    0.00001,
    0.00005,
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
)
"""One ``process()`` call on one batch."""


# -- shapes of the records the collector reads (never a stage module import) -------------


@runtime_checkable
class _HasStatistics(Protocol):
    def statistics(self) -> object: ...


@runtime_checkable
class _SamplerLike(Protocol):
    """``stages.sampler.SamplerStatistics``."""

    sample_rate: int
    gate_attached: bool


@runtime_checkable
class _BreakerLike(Protocol):
    """``stages.breaker.CircuitBreakerStatistics``."""

    breaker: BreakerStatistics
    fallback_events: int


@runtime_checkable
class _RingLike(Protocol):
    """``stages.reader.RingBufferReaderStatistics``."""

    ring_usage: float
    kernel: KernelCounters


@runtime_checkable
class _KernelProgram(Protocol):
    """What the collector reads of a published BPF program (``bpf.programs.LoadedProgram``);
    ``latency_histogram()``, ``map_usage()``, ``sample_rate()`` and ``xdp`` are optional."""

    @property
    def name(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def kernel_stats(self) -> Mapping[str, int]: ...


# -- the per-batch part: pure, vectorised -------------------------------------------------


_min, _max, _sum = np.minimum.reduce, np.maximum.reduce, np.add.reduce  # no method lookup per batch
_bisect_left = bisect.bisect_left
_FEW_STAMPS = 256
"""Up to this many stamps, :meth:`LatencyHistogram.observe_ages` works on Python ints: a
trickle's batch comes after 100 ms asleep, when numpy's calls run cold (100 stamps 0-100 ms
old: 139-142 µs with numpy, 93-95 as ints; median of the first call after each 100 ms sleep)."""


class LatencyHistogram:
    """Cumulative-ready bucket counts of values observed in bulk (per batch).

    ``counts[i]`` holds values ``<= bounds[i]`` and above the previous bound (the
    last slot: above every bound), the Prometheus ``le`` rule.
    """

    def __init__(self, bounds: Sequence[float], scale: float = 1.0) -> None:
        self.bounds = tuple(bounds)
        self._edges = np.asarray([round(b * scale) for b in self.bounds], dtype=np.int64)
        self._edge_list: list[int] = self._edges.tolist()
        self._scale = scale
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum_units = 0
        """Sum of observations in integer units (``scale`` units per bound unit)."""

    def observe_many(self, values: npt.NDArray[np.int64]) -> None:
        if values.size == 0:
            return
        index = np.searchsorted(self._edges, values, side="left")
        for slot, count in enumerate(np.bincount(index, minlength=len(self.counts)).tolist()):
            self.counts[slot] += count
        self.sum_units += int(values.sum())

    def observe_ages(self, stamps: npt.NDArray[Any], now: int) -> None:
        """Observe ``now - stamps`` (ages, at least 0) without making that array.

        ``age <= bound`` is ``stamp >= now - bound``: from the batch's oldest and
        newest stamps, only the bounds the batch straddles need a count (one
        ``count_nonzero`` each); a batch inside one bucket (the usual case) costs a
        min, a max and a sum. Exact, like :meth:`observe_many`."""
        n = len(stamps)
        if n == 0:
            return
        if n <= _FEW_STAMPS and stamps.dtype.kind in "iu":
            self._observe_few_ages(stamps.tolist(), now)
            return
        if not stamps.flags.c_contiguous:  # a field of a structured batch: one copy makes
            stamps = np.ascontiguousarray(stamps)  # the three reductions below ~2x faster
        lo, hi = int(_min(stamps)), int(_max(stamps))
        if hi > now:  # a stamp from "after" now: clip its age to 0 the plain way
            ages = np.subtract(now, stamps.astype(np.int64), dtype=np.int64)
            np.maximum(ages, 0, out=ages)
            self.observe_many(ages)
            return
        edges = self._edge_list
        first = _bisect_left(edges, now - hi)
        if first == len(edges) or now - lo <= edges[first]:  # one bucket: the usual case
            self.counts[first] += n
        else:
            last = _bisect_left(edges, now - lo)
            below = 0  # ages <= edges[k], cumulative
            for k in range(first, last):
                within = int(np.count_nonzero(stamps >= max(0, now - edges[k])))
                self.counts[k] += within - below
                below = within
            self.counts[last] += n - below
        if n * max(abs(lo), hi) < 1 << 63:
            total = int(_sum(stamps))
        else:  # the sum would wrap: add offsets from the oldest (a batch spans little time)
            total = n * lo + int(_sum(stamps - stamps.dtype.type(lo)))
        self.sum_units += n * now - total

    def _observe_few_ages(self, stamps: list[int], now: int) -> None:
        """:meth:`observe_ages` on Python ints (exact: they do not wrap, so a garbage stamp
        cannot overflow anything)."""
        lo, hi = min(stamps), max(stamps)
        edges = self._edge_list
        counts = self.counts
        if hi > now:  # a stamp from "after" now: its age is 0
            ages = [now - stamp if stamp < now else 0 for stamp in stamps]
            for age in ages:
                counts[_bisect_left(edges, age)] += 1
            self.sum_units += sum(ages)
            return
        first = _bisect_left(edges, now - hi)
        if first == len(edges) or now - lo <= edges[first]:  # one bucket: the usual case
            counts[first] += len(stamps)
        else:
            last = _bisect_left(edges, now - lo)
            for stamp in stamps:
                counts[_bisect_left(edges, now - stamp, first, last)] += 1
        self.sum_units += len(stamps) * now - sum(stamps)

    def buckets(self) -> list[tuple[str, float]]:
        labels = [_le(b) for b in self.bounds] + ["+Inf"]
        return list(zip(labels, (float(c) for c in itertools.accumulate(self.counts)), strict=True))

    @property
    def sum(self) -> float:
        return self.sum_units / self._scale

    @property
    def count(self) -> int:
        return sum(self.counts)


class _StageTimer:
    """One stage's ``process()`` timings, for per-stage histograms (see the module docstring).
    Plain Python ints: one observation per batch costs a bisect and two additions."""

    def __init__(self) -> None:
        self.bounds_ns = [round(b * 1e9) for b in STAGE_TIME_BUCKETS_S]
        self.counts = [0] * (len(self.bounds_ns) + 1)
        self.sum_ns = 0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        labels = [_le(b) for b in STAGE_TIME_BUCKETS_S] + ["+Inf"]
        return list(zip(labels, (float(c) for c in itertools.accumulate(self.counts)), strict=True))


def _le(bound: float) -> str:
    return repr(float(bound))


def _timestamp_field(dtype: np.dtype[Any]) -> str | tuple[str, str] | None:
    """Where a batch keeps its integer ``ts_ns``: the field name (``"ts_ns"``, decoded
    BPF events and synthetic ones: the header is flattened), ``("hdr", "ts_ns")`` for
    a nested header, or None (not observed)."""
    names = dtype.names
    if not names:
        return None
    if "ts_ns" in names:
        return "ts_ns" if dtype["ts_ns"].kind in "iu" else None
    if "hdr" in names:
        hdr = dtype["hdr"]
        if hdr.names and "ts_ns" in hdr.names and hdr["ts_ns"].kind in "iu":
            return ("hdr", "ts_ns")
    return None


# -- the exporter ------------------------------------------------------------------------


class MetricsExporter:
    """The Prometheus registry and ``/metrics``; see the module docstring."""

    def __init__(self, config: Config, *, enforcer: Any = None) -> None:
        self.config = config
        self.enforcer = enforcer
        self.enhanced: bool = config.feature_flags.enhanced_metrics
        """Per-stage processing-time histograms and per-event-type counters; settable live."""
        self.reload_statistics: Callable[[], Any] | None = None
        """The reloader's ``statistics`` (version, failures, last_reload_unix), when there is one."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.end_to_end = LatencyHistogram(END_TO_END_BUCKETS_S, scale=1e9)
        self.events_by_type: dict[str, int] = {}
        self.stage_timers: dict[str, _StageTimer] = {}
        self.clock_ns: Callable[[], int] = time.monotonic_ns
        self._pipe: Pipeline | None = None
        self._last_kernel: dict[int, dict[str, Any]] = {}
        self._stamp_fields: dict[int, tuple[np.dtype[Any], str | tuple[str, str] | None]] = {}
        self._collector = _Collector(self)
        self.registry.register(self._collector)
        ProcessCollector(namespace="", registry=self.registry)

    # -- composition ----------------------------------------------------------------
    def attach(self, pipe: Pipeline) -> None:
        """Install the per-batch hooks on ``pipe``: the sink observer, and the timer
        around ``process()`` of every per-batch stage not yet timed. Idempotent; call
        it again after a live graph switch, before the new stages start (a running
        ``BatchStage`` has already bound its ``process``)."""
        self._pipe = pipe
        if self.observe_sink_batch not in pipe.sink_observers:
            pipe.sink_observers.append(self.observe_sink_batch)
        for node, ctx in zip(pipe.nodes, pipe.contexts, strict=True):
            if isinstance(node, BatchStage) and not getattr(node.process, "timed_by_metrics", False):
                node.process = self._timed(ctx.name, node.process)  # type: ignore[method-assign,assignment]

    def routes(self, pipe: Pipeline) -> list[Route]:
        self.attach(pipe)

        async def metrics(request: Request) -> Response:
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4)

        return [Route("GET", "/metrics", metrics)]

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A pipeline helper: attaches (if ``build_agent`` has not) and returns."""
        self.attach(pipe)
        task_status.started()

    def snapshot_text(self, pipe: Pipeline) -> str:
        """The exposition (Prometheus text format) of ``pipe`` as it stands now."""
        self._pipe = pipe
        return generate_latest(self.registry).decode()

    # -- per-batch hooks ------------------------------------------------------------
    def observe_sink_batch(self, batch: Batch) -> Batch:
        """A sink observer: end-to-end latency (and, enhanced, events by type) of one batch."""
        events = batch.events
        if not len(events):
            return batch
        dtype = events.dtype
        known = self._stamp_fields.get(id(dtype))
        if known is None or known[0] is not dtype:  # keeps the dtype: its id is not reused
            if len(self._stamp_fields) >= 64:  # a source that makes a new dtype per batch
                self._stamp_fields.clear()
            known = self._stamp_fields[id(dtype)] = (dtype, _timestamp_field(dtype))
        field = known[1]
        if field is not None:
            stamps = events[field] if isinstance(field, str) else events[field[0]][field[1]]
            self.end_to_end.observe_ages(stamps, self.clock_ns())
        if self.enhanced:
            self._count_types(batch)
        return batch

    def _count_types(self, batch: Batch) -> None:
        counts = self.events_by_type
        if batch.event_name:
            counts[batch.event_name] = counts.get(batch.event_name, 0) + len(batch)
            return
        names = batch.events.dtype.names or ()
        if "type" in names and batch.events["type"].dtype.kind in "iu":
            ids, per_id = np.unique(batch.events["type"], return_counts=True)
            for type_id, n in zip(ids.tolist(), per_id.tolist(), strict=True):
                key = f"type_{type_id}"
                counts[key] = counts.get(key, 0) + n
            return
        counts["unknown"] = counts.get("unknown", 0) + len(batch)

    def _timed(self, stage: str, process: Callable[[Batch], Batch | None]) -> Callable[[Batch], Batch | None]:
        timer = self.stage_timers.setdefault(stage, _StageTimer())
        clock, bounds, counts = time.perf_counter_ns, timer.bounds_ns, timer.counts

        def timed_process(batch: Batch) -> Batch | None:
            if not self.enhanced:
                return process(batch)
            start = clock()
            try:
                return process(batch)
            finally:
                elapsed = clock() - start
                counts[_bisect_left(bounds, elapsed)] += 1
                timer.sum_ns += elapsed

        timed_process.timed_by_metrics = True  # type: ignore[attr-defined]
        return timed_process

    # -- reading the kernel (at scrape time) -----------------------------------------
    def kernel_readings(self, pipe: Pipeline) -> list[dict[str, Any]]:
        """One record per published program: its kernel values now, or (closed) as last read."""
        readings = []
        for program in _programs(pipe):
            key = id(program)
            if program.closed:
                last = self._last_kernel.get(key)
                final = getattr(program, "last_kernel_stats", None)
                if last is None and isinstance(final, Mapping):
                    last = {"name": program.name, "xdp": bool(getattr(program, "xdp", False))}
                if last is not None:
                    if isinstance(final, Mapping):
                        last = {**last, "stats": dict(final)}
                    readings.append(last)
                continue
            reading: dict[str, Any] = {"name": program.name, "xdp": bool(getattr(program, "xdp", False))}
            for field, method in (
                ("stats", "kernel_stats"),
                ("latency", "latency_histogram"),
                ("maps", "map_usage"),
                ("sample_rate", "sample_rate"),
            ):
                read = getattr(program, method, None)
                if not callable(read):
                    continue
                try:
                    reading[field] = read()
                except Exception as exc:  # one unreadable map must not take /metrics down
                    log.warning(
                        "cannot read %s of BPF program %r: %s: %s",
                        method,
                        program.name,
                        type(exc).__name__,
                        exc,
                    )
            self._last_kernel[key] = reading
            readings.append(reading)
        return readings


def _programs(pipe: Pipeline) -> list[_KernelProgram]:
    return [p for p in pipe.services.published_programs() if isinstance(p, _KernelProgram)]


# -- the collector -------------------------------------------------------------------------


class _Collector(Collector):
    """Builds every family from the exporter's pipeline at scrape time."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterable[Metric]:
        exporter = self.exporter
        yield from _build_info()
        yield from _reload_families(exporter.reload_statistics)
        pipe = exporter._pipe
        if pipe is None:
            return
        errors = CounterMetricFamily(
            "bpf_errors",
            "Failures: kernel (helper or map-update failures and malformed input: STAT_ERRORS; "
            "ring-buffer reservations that failed: STAT_LOST_RESERVE) and user space (stage errors)",
            labels=["layer", "component", "kind"],
        )
        yield from _kernel_families(exporter.kernel_readings(pipe), errors)
        yield from _pipeline_families(pipe, exporter, errors)
        yield errors
        yield from _histogram_families(exporter)


def _build_info() -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "bpfpipe_build_info", "bpfpipe's version and Python's; always 1", labels=["version", "python"]
    )
    info.add_metric([__version__, platform.python_version()], 1)
    yield info


def _reload_families(statistics: Callable[[], Any] | None) -> Iterator[Metric]:
    version, failures, last = 1, 0, None
    if statistics is not None:
        try:
            record = statistics()
        except Exception as exc:  # the reloader's trouble must not take /metrics down
            log.warning("cannot read the reloader's statistics: %s: %s", type(exc).__name__, exc)
        else:
            version = int(getattr(record, "version", 1))
            failures = int(getattr(record, "failures", 0))
            last = getattr(record, "last_reload_unix", None)
    yield GaugeMetricFamily(
        "bpfpipe_config_version", "The configuration in force: 1 at start, +1 per applied reload", version
    )
    yield CounterMetricFamily(
        "bpfpipe_config_reload_failures", "Reloads rejected (the old config stayed in force)", failures
    )
    if last:  # 0 or None: no reload applied yet
        yield GaugeMetricFamily(
            "bpfpipe_config_last_reload_timestamp_seconds",
            "When the last reload was applied (Unix time)",
            float(last),
        )


def _kernel_families(readings: Sequence[Mapping[str, Any]], errors: CounterMetricFamily) -> Iterator[Metric]:
    processed = CounterMetricFamily(
        "bpf_packets_processed", "Packets the XDP program saw (STAT_PROCESSED)", labels=["program"]
    )
    dropped = CounterMetricFamily(
        "bpf_packets_dropped", "Packets the XDP program dropped (STAT_DROPPED)", labels=["program"]
    )
    entries = GaugeMetricFamily("bpf_map_entries", "Entries in a BPF hash map", labels=["program", "map"])
    max_entries = GaugeMetricFamily(
        "bpf_map_max_entries", "Capacity of a BPF hash map", labels=["program", "map"]
    )
    latency = HistogramMetricFamily(
        "bpf_processing_latency_ns",
        "Time the XDP program spent per packet, in ns (in-kernel histogram: no _sum)",
        labels=["program"],
    )
    fates = CounterMetricFamily(
        "bpfpipe_kernel_events",
        "Kernel-side events by fate: emitted to the ring, sampled out by the gate, lost on reserve",
        labels=["program", "fate"],
    )
    kernel_rate = GaugeMetricFamily(
        "bpfpipe_kernel_sampling_rate", "In-kernel sampling: 1 event kept in N", labels=["program"]
    )
    for reading in readings:
        name = str(reading["name"])
        stats = reading.get("stats")
        if isinstance(stats, Mapping):
            if reading.get("xdp"):
                processed.add_metric([name], stats.get("processed", 0))
                dropped.add_metric([name], stats.get("dropped", 0))
            errors.add_metric(["kernel", name, "errors"], stats.get("errors", 0))
            errors.add_metric(["kernel", name, "lost_reserve"], stats.get("lost_reserve", 0))
            for fate in ("emitted", "sampled_out", "lost_reserve"):
                fates.add_metric([name, fate], stats.get(fate, 0))
        for map_name, (count, capacity) in sorted((reading.get("maps") or {}).items()):
            entries.add_metric([name, map_name], count)
            max_entries.add_metric([name, map_name], capacity)
        rows = reading.get("latency")
        if isinstance(rows, Mapping) and len(rows) == len(KERNEL_LATENCY_BUCKETS_NS) + 1:
            counts = list(rows.values())  # in bucket order (latency_hist rows)
            cumulative = np.cumsum(counts).tolist()
            labels = [str(b) for b in KERNEL_LATENCY_BUCKETS_NS] + ["+Inf"]
            buckets = list(zip(labels, (float(c) for c in cumulative), strict=True))
            latency.add_metric([name], buckets, None)
            latency.samples.append(
                Sample("bpf_processing_latency_ns_count", {"program": name}, cumulative[-1])
            )
        if "sample_rate" in reading:
            kernel_rate.add_metric([name], reading["sample_rate"])
    yield from (processed, dropped, entries, max_entries, latency, fates, kernel_rate)


def _pipeline_families(
    pipe: Pipeline, exporter: MetricsExporter, errors: CounterMetricFamily
) -> Iterator[Metric]:
    stats = pipe.statistics()
    ledger = stats.ledger
    yield CounterMetricFamily(
        "bpfpipe_events_produced", "Events the sources produced (kernel and user space)", ledger.produced
    )
    outcomes = CounterMetricFamily(
        "bpfpipe_events",
        "Events by final outcome, the stage that decided it and why (the ledger)",
        labels=["outcome", "stage", "reason"],
    )
    weighted = CounterMetricFamily(
        "bpfpipe_events_weighted",
        "The ledger's outcomes weighted by sampling rate: estimates of the true event counts",
        labels=["outcome", "stage", "reason"],
    )
    for key, tally in sorted(ledger.outcomes.items()):
        labels = [key.outcome.value, key.stage, key.reason]
        outcomes.add_metric(labels, tally.count)
        weighted.add_metric(labels, tally.weight)
    yield outcomes
    yield weighted
    yield GaugeMetricFamily(
        "bpfpipe_events_estimated_true",
        "Sampling-weighted estimate of how many events really happened (sampled-out outcomes excluded)",
        ledger.estimated_true_count(),
    )
    yield GaugeMetricFamily("bpfpipe_events_pending", "Produced, not yet in an outcome", ledger.pending)

    batches = CounterMetricFamily(
        "bpfpipe_stage_batches", "Batches a stage received (in) and sent (out)", labels=["stage", "direction"]
    )
    events = CounterMetricFamily(
        "bpfpipe_stage_events",
        "Events a stage received (in), sent (out), produced (source), dropped and delivered (sink)",
        labels=["stage", "direction"],
    )
    stage_errors = CounterMetricFamily(
        "bpfpipe_stage_errors", "Exceptions a stage raised (logged)", labels=["stage"]
    )
    for s in stats.stages:
        batches.add_metric([s.name, "in"], s.received_batches)
        batches.add_metric([s.name, "out"], s.sent_batches)
        for direction, value in (
            ("in", s.received_events),
            ("out", s.sent_events),
            ("produced", s.produced_events),
            ("dropped", s.dropped_events),
            ("delivered", s.delivered_events),
        ):
            events.add_metric([s.name, direction], value)
        stage_errors.add_metric([s.name], s.errors)
        errors.add_metric(["user", s.name, "stage_error"], s.errors)
    yield batches
    yield events
    yield stage_errors

    depth = GaugeMetricFamily(
        "bpfpipe_channel_depth_batches", "Batches queued in a channel", labels=["channel"]
    )
    peak = GaugeMetricFamily(
        "bpfpipe_channel_peak_depth_batches", "Most batches a channel has held", labels=["channel"]
    )
    capacity = GaugeMetricFamily(
        "bpfpipe_channel_capacity_batches", "A channel's capacity", labels=["channel"]
    )
    queued = GaugeMetricFamily(
        "bpfpipe_channel_queued_events", "Events handed to send and not yet received", labels=["channel"]
    )
    full_waits = CounterMetricFamily(
        "bpfpipe_channel_full_waits",
        "Times the producer found the channel full and waited for the consumer",
        labels=["channel"],
    )
    for e in stats.edges:
        depth.add_metric([e.name], e.depth)
        peak.add_metric([e.name], e.peak_depth)
        capacity.add_metric([e.name], e.capacity)
        queued.add_metric([e.name], e.queued_events)
        full_waits.add_metric([e.name], e.full_waits)
    yield from (depth, peak, capacity, queued, full_waits)

    budget = stats.budget
    yield GaugeMetricFamily(
        "bpfpipe_inflight_events", "Events admitted, not yet given an outcome", budget.events
    )
    yield GaugeMetricFamily("bpfpipe_inflight_bytes", "Bytes of batches in flight", budget.bytes)
    yield GaugeMetricFamily(
        "bpfpipe_inflight_max_events", "limits.max_inflight_events (0: unbounded)", budget.max_events
    )
    yield GaugeMetricFamily(
        "bpfpipe_inflight_max_bytes", "limits.max_inflight_bytes (0: unbounded)", budget.max_bytes
    )

    yield from _node_families(pipe)
    yield from _enforcer_families(exporter.enforcer)


def _node_families(pipe: Pipeline) -> Iterator[Metric]:
    rate = GaugeMetricFamily(
        "bpfpipe_sampling_rate",
        "Sampler: 1 event kept in N of the kernel's (fractional where a limit sets it)",
        labels=["stage"],
    )
    state = GaugeMetricFamily(
        "bpfpipe_breaker_state", "Circuit breaker state (1 for the current one)", labels=["stage", "state"]
    )
    opened = CounterMetricFamily("bpfpipe_breaker_opened", "Times a breaker opened", labels=["stage"])
    fallback = CounterMetricFamily(
        "bpfpipe_breaker_fallback_events", "Events a breaker's fallback kept", labels=["stage"]
    )
    replayed = CounterMetricFamily(
        "bpfpipe_breaker_replayed_events",
        "Spooled events a breaker replayed through its recovered primary (their outcome stays fallback)",
        labels=["stage"],
    )
    ring = GaugeMetricFamily(
        "bpf_ringbuf_usage_percent", "Ring buffer in use when the reader last looked", labels=["program"]
    )
    records_read = CounterMetricFamily(
        "bpfpipe_ringbuf_records_read", "Records the reader took from the ring", labels=["program"]
    )
    bytes_read = CounterMetricFamily(
        "bpfpipe_ringbuf_bytes_read",
        "Ring bytes the reader consumed (records with their 8-byte headers; what capacity planning sizes)",
        labels=["program"],
    )
    for node, ctx in zip(pipe.nodes, pipe.contexts, strict=True):
        if not isinstance(node, _HasStatistics):
            continue
        record = node.statistics()
        if isinstance(record, _SamplerLike):
            rate.add_metric([ctx.name], getattr(record, "exact_rate", record.sample_rate))
        if isinstance(record, _BreakerLike):
            current = record.breaker.state
            for candidate in BreakerState:
                state.add_metric([ctx.name, candidate.value], 1 if candidate is current else 0)
            opened.add_metric([ctx.name], record.breaker.opened)
            fallback.add_metric([ctx.name], record.fallback_events)
            replayed.add_metric([ctx.name], getattr(record, "replayed_events", 0))
        if isinstance(record, _RingLike):
            program = getattr(node, "program", None)
            name = str(getattr(program, "name", ctx.name))
            ring.add_metric([name], 100.0 * record.ring_usage)
            records_read.add_metric([name], getattr(record, "records_read", 0))
            bytes_read.add_metric([name], getattr(record, "bytes_read", 0))
    yield from (rate, state, opened, fallback, replayed, ring, records_read, bytes_read)


def _enforcer_families(enforcer: Any) -> Iterator[Metric]:
    actions = CounterMetricFamily(
        "bpfpipe_enforcer_actions",
        "Resource-limit actions taken (memory pressure on/off, map trims)",
        labels=["action"],
    )
    if enforcer is not None:
        for action, count in sorted(dict(enforcer.counts).items()):
            actions.add_metric([action], count)
        evicted = getattr(enforcer, "evicted_entries", None)
        if evicted is not None:
            yield CounterMetricFamily(
                "bpfpipe_enforcer_evicted_entries", "BPF map entries trimmed by the enforcer", int(evicted)
            )
    yield actions


def _histogram_families(exporter: MetricsExporter) -> Iterator[Metric]:
    e2e = exporter.end_to_end
    yield HistogramMetricFamily(
        "bpfpipe_end_to_end_latency_seconds",
        "Kernel timestamp (ts_ns) to the sink, per event, in seconds",
        buckets=e2e.buckets(),
        sum_value=e2e.sum,
    )
    if not exporter.enhanced:
        return
    stage_time = HistogramMetricFamily(
        "bpfpipe_stage_processing_seconds",
        "Time in one call of a per-batch stage's process(), per batch (enhanced_metrics)",
        labels=["stage"],
    )
    for stage, timer in exporter.stage_timers.items():
        stage_time.add_metric([stage], timer.buckets(), timer.sum_ns / 1e9)
    yield stage_time
    by_type = CounterMetricFamily(
        "bpfpipe_events_by_type",
        "Events reaching the sink, by event type (enhanced_metrics)",
        labels=["event"],
    )
    for event, count in sorted(exporter.events_by_type.items()):
        by_type.add_metric([event], count)
    yield by_type
