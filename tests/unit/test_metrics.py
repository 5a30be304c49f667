"""The Prometheus collector against pipelines with known outcomes: exact values."""

from __future__ import annotations

import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio
from _exposition import names, parse, value
from _tools import require_tools
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Batch, BatchStage, NodeSpec, Pipeline, __version__
from pipeline.breaker import BreakerState, BreakerStatistics
from pipeline.health import HealthMonitor
from pipeline.metrics import END_TO_END_BUCKETS_S, LatencyHistogram, MetricsExporter
from pipeline.ring_accounting import KernelCounters
from pipeline.testing import TestingSink, TestingSource, TestingSourceConfig, make_batch, settings

PROMTOOL = "/usr/bin/promtool"


class DropOdd(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch.select(batch.events["value"] % 2 == 0)


class FailOnSeq1(BatchStage):
    def process(self, batch: Batch) -> Batch:
        if batch.seq == 1:
            raise ValueError("boom")
        return batch


def batches(n: int, size: int, ts_ns: int = 0) -> list[Batch]:
    out = []
    for i in range(n):
        b = make_batch(
            seq=i, value=np.arange(i * size, (i + 1) * size), ts_ns=np.full(size, ts_ns, np.uint64)
        )
        b.event_name = "synthetic"
        out.append(b)
    return out


def build(source_batches: list[Batch], **config: Any) -> tuple[Pipeline, MetricsExporter]:
    specs = [
        NodeSpec("source", TestingSource, TestingSourceConfig(tuple(source_batches))),
        NodeSpec("drop_odd", DropOdd),
        NodeSpec("fail_seq1", FailOnSeq1),
        NodeSpec("sink", TestingSink),
    ]
    cfg = settings(limits={"max_inflight_events": 0, "max_inflight_bytes": 0}, **config)
    pipe = Pipeline(specs, [4, 4, 4], settings=cfg)
    exporter = MetricsExporter(cfg, enforcer=SimpleNamespace(counts={"trim_map": 2}, evicted_entries=7))
    exporter.attach(pipe)
    return pipe, exporter


async def test_ledger_stages_channels_exact() -> None:
    # 3 batches x 10 events: drop_odd keeps 5 of each; fail_seq1 raises on batch 1 (5 dropped, "error").
    pipe, exporter = build(batches(3, 10))
    await pipe.run()
    s = parse(exporter.snapshot_text(pipe))
    assert value(s, "bpfpipe_events_produced_total") == 30
    assert value(s, "bpfpipe_events_total", outcome="delivered", stage="sink", reason="") == 10
    assert (
        value(s, "bpfpipe_events_total", outcome="stage_dropped", stage="drop_odd", reason="filtered") == 15
    )
    assert value(s, "bpfpipe_events_total", outcome="stage_dropped", stage="fail_seq1", reason="error") == 5
    assert value(s, "bpfpipe_events_weighted_total", outcome="delivered", stage="sink", reason="") == 10.0
    assert value(s, "bpfpipe_events_estimated_true") == 30.0
    assert value(s, "bpfpipe_events_pending") == 0
    assert value(s, "bpfpipe_stage_batches_total", stage="drop_odd", direction="in") == 3
    assert value(s, "bpfpipe_stage_batches_total", stage="fail_seq1", direction="out") == 2
    assert value(s, "bpfpipe_stage_events_total", stage="drop_odd", direction="out") == 15
    assert value(s, "bpfpipe_stage_events_total", stage="sink", direction="delivered") == 10
    assert value(s, "bpfpipe_stage_errors_total", stage="fail_seq1") == 1
    assert value(s, "bpfpipe_stage_errors_total", stage="drop_odd") == 0
    assert value(s, "bpf_errors_total", layer="user", component="fail_seq1", kind="stage_error") == 1
    assert value(s, "bpfpipe_channel_capacity_batches", channel="source->drop_odd") == 4
    assert value(s, "bpfpipe_channel_depth_batches", channel="fail_seq1->sink") == 0
    assert value(s, "bpfpipe_inflight_events") == 0
    assert value(s, "bpfpipe_enforcer_actions_total", action="trim_map") == 2
    assert value(s, "bpfpipe_enforcer_evicted_entries_total") == 7
    assert value(s, "bpfpipe_build_info", version=__version__, python=platform.python_version()) == 1
    assert value(s, "bpfpipe_config_version") == 1
    assert value(s, "bpfpipe_config_reload_failures_total") == 0
    assert "bpfpipe_config_last_reload_timestamp_seconds" not in names(s)
    assert "process_cpu_seconds_total" in names(s)


async def test_end_to_end_latency_is_exact_per_event() -> None:
    # Two events per batch reach the sink for batches 0 and 2; pin the clock at 3 ms after ts_ns.
    pipe, exporter = build(batches(3, 4, ts_ns=1_000_000_000))
    exporter.clock_ns = lambda: 1_000_000_000 + 3_000_000
    await pipe.run()
    s = parse(exporter.snapshot_text(pipe))
    assert value(s, "bpfpipe_end_to_end_latency_seconds_count") == 4
    assert value(s, "bpfpipe_end_to_end_latency_seconds_sum") == pytest.approx(4 * 0.003)
    assert value(s, "bpfpipe_end_to_end_latency_seconds_bucket", le="0.0025") == 0
    assert value(s, "bpfpipe_end_to_end_latency_seconds_bucket", le="0.005") == 4
    assert value(s, "bpfpipe_end_to_end_latency_seconds_bucket", le="+Inf") == 4


def test_latency_histogram_bucket_edges_follow_le() -> None:
    h = LatencyHistogram(END_TO_END_BUCKETS_S, scale=1e9)
    h.observe_many(np.array([0, 500_000, 500_001, 10**12], dtype=np.int64))  # 0, 0.5 ms, just over, 1000 s
    buckets = dict(h.buckets())
    assert buckets["0.0005"] == 2  # le is inclusive
    assert buckets["0.001"] == 3
    assert buckets["10.0"] == 3
    assert buckets["+Inf"] == 4
    assert h.count == 4


@pytest.mark.parametrize("seed", range(40))
def test_observe_ages_equals_the_plain_per_event_histogram(seed: int) -> None:
    rng = np.random.default_rng(seed)
    now = int(rng.integers(1, 1 << 62))
    n = int(rng.integers(1, 3000 if seed % 2 else 257))  # odd seeds: mostly the numpy path
    spread = int(rng.choice([0, 1000, 3_000_000, 200_000_000, 30_000_000_000]))
    stamps = (now - rng.integers(0, spread + 1, n) - int(rng.integers(0, 2_000_000))).astype(
        np.uint64 if seed % 4 < 2 else np.int64
    )
    if seed % 5 == 0:
        stamps[0] = now + 5  # stamped "after" now: age 0
    fast, plain = LatencyHistogram(END_TO_END_BUCKETS_S, 1e9), LatencyHistogram(END_TO_END_BUCKETS_S, 1e9)
    fast.observe_ages(stamps, now)
    ages = np.maximum(now - stamps.astype(object), 0).astype(np.int64)  # exact Python-int arithmetic
    plain.observe_many(ages)
    assert fast.counts == plain.counts
    assert fast.sum_units == int(sum(int(a) for a in ages))


def test_a_small_batch_with_garbage_stamps_is_observed_exactly() -> None:
    now = 10**18
    stamps = np.array([now + 5, -(2**63), now - 2_000_000], dtype=np.int64)  # after now; garbage; 2 ms
    h = LatencyHistogram(END_TO_END_BUCKETS_S, 1e9)
    h.observe_ages(stamps, now)
    buckets = dict(h.buckets())
    assert buckets["0.0005"] == 1  # the stamp from after now: age 0
    assert buckets["0.0025"] == 2 and buckets["10.0"] == 2 and buckets["+Inf"] == 3
    assert h.sum_units == 0 + (now + 2**63) + 2_000_000  # no wrap


def test_batches_without_timestamps_are_not_observed() -> None:
    exporter = MetricsExporter(settings())
    exporter.observe_sink_batch(make_batch(value=[1, 2, 3]))
    exporter.observe_sink_batch(make_batch(ts_ns=[1.5, 2.5]))  # not an integer clock
    assert exporter.end_to_end.count == 0
    nested = np.zeros(2, dtype=[("hdr", [("type", "<u2"), ("ts_ns", "<u8")]), ("pid", "<u4")])
    nested["hdr"]["ts_ns"] = 10
    exporter.clock_ns = lambda: 20
    exporter.observe_sink_batch(Batch(nested))
    assert exporter.end_to_end.count == 2
    assert exporter.end_to_end.sum_units == 20


async def test_enhanced_metrics_only_when_on_and_live() -> None:
    pipe, exporter = build(batches(3, 10))
    assert exporter.enhanced is False
    s = parse(exporter.snapshot_text(pipe))
    assert not {n for n in names(s) if n.startswith(("bpfpipe_stage_processing", "bpfpipe_events_by_type"))}
    exporter.enhanced = True  # flipped live, as a reload would
    await pipe.run()
    s = parse(exporter.snapshot_text(pipe))
    assert value(s, "bpfpipe_stage_processing_seconds_count", stage="drop_odd") == 3
    assert value(s, "bpfpipe_stage_processing_seconds_count", stage="fail_seq1") == 3  # the raise too
    assert value(s, "bpfpipe_stage_processing_seconds_sum", stage="drop_odd") > 0
    assert value(s, "bpfpipe_events_by_type_total", event="synthetic") == 10
    exporter.enhanced = False
    s = parse(exporter.snapshot_text(pipe))
    assert "bpfpipe_stage_processing_seconds_count" not in names(s)


async def test_enhanced_off_records_nothing() -> None:
    pipe, exporter = build(batches(2, 4))
    await pipe.run()
    assert all(t.count == 0 for t in exporter.stage_timers.values())
    assert exporter.events_by_type == {}


def test_reload_statistics() -> None:
    exporter = MetricsExporter(settings())
    exporter.reload_statistics = lambda: SimpleNamespace(version=4, failures=2, last_reload_unix=1765000000.5)
    s = parse(
        exporter.snapshot_text(Pipeline([NodeSpec("a", TestingSource), NodeSpec("b", TestingSink)], [1]))
    )
    assert value(s, "bpfpipe_config_version") == 4
    assert value(s, "bpfpipe_config_reload_failures_total") == 2
    assert value(s, "bpfpipe_config_last_reload_timestamp_seconds") == 1765000000.5


# -- kernel side, with a program double ---------------------------------------------------


class FakeProgram:
    name = "xdp_firewall"
    xdp = True

    def __init__(self) -> None:
        self.closed = False
        self.stats = {
            "events": 9,
            "sampled_out": 2,
            "lost_reserve": 1,
            "emitted": 6,
            "processed": 40,
            "dropped": 9,
            "errors": 3,
        }
        self.last_kernel_stats: dict[str, int] | None = None

    def set_sample_rate(self, rate: int) -> None:
        pass

    def sample_rate(self) -> int:
        return 4

    def kernel_stats(self) -> dict[str, int]:
        if self.closed:
            raise RuntimeError("closed")
        self.last_kernel_stats = dict(self.stats)
        return dict(self.stats)

    def latency_histogram(self) -> dict[str, int]:
        return {"lt_100ns": 5, "lt_500ns": 20, "lt_1us": 10, "lt_5us": 4, "lt_10us": 0, "ge_10us": 1}

    def map_usage(self) -> dict[str, tuple[int, int]]:
        return {"blocked_v4": (3, 65536), "rate_limit_state": (12, 65536)}


@dataclass(frozen=True)
class RingStats:
    ring_usage: float
    kernel: KernelCounters


@dataclass(frozen=True)
class SamplerStats:
    sample_rate: int
    gate_attached: bool


@dataclass(frozen=True)
class BreakerStats:
    breaker: BreakerStatistics
    fallback_events: int


class FakeReader(TestingSource):
    def __init__(self, config: Any, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.program = FakeProgram()

    def statistics(self) -> RingStats:
        return RingStats(0.375, KernelCounters(9, 2, 1, 6))


class FakeSampler(DropOdd):
    def statistics(self) -> SamplerStats:
        return SamplerStats(8, True)


class FakeBreaker(FailOnSeq1):
    def statistics(self) -> BreakerStats:
        b = BreakerStatistics(BreakerState.OPEN, 5, 1, 2, 0, 0, 5, 12.0)
        return BreakerStats(b, 42)


def kernel_pipeline() -> tuple[Pipeline, MetricsExporter, FakeProgram]:
    specs = [
        NodeSpec("reader", FakeReader, TestingSourceConfig(())),
        NodeSpec("sampler", FakeSampler),
        NodeSpec("breaker", FakeBreaker),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [2, 2, 2], settings=settings())
    reader = pipe.nodes[0]
    assert isinstance(reader, FakeReader)
    pipe.services.publish(0, reader.program)
    exporter = MetricsExporter(pipe.settings)
    exporter.attach(pipe)
    return pipe, exporter, reader.program


def test_kernel_families_from_a_published_program() -> None:
    pipe, exporter, _ = kernel_pipeline()
    s = parse(exporter.snapshot_text(pipe))
    assert value(s, "bpf_packets_processed_total", program="xdp_firewall") == 40
    assert value(s, "bpf_packets_dropped_total", program="xdp_firewall") == 9
    assert value(s, "bpf_errors_total", layer="kernel", component="xdp_firewall", kind="errors") == 3
    assert value(s, "bpf_errors_total", layer="kernel", component="xdp_firewall", kind="lost_reserve") == 1
    assert value(s, "bpf_map_entries", program="xdp_firewall", map="rate_limit_state") == 12
    assert value(s, "bpf_map_max_entries", program="xdp_firewall", map="blocked_v4") == 65536
    assert value(s, "bpf_ringbuf_usage_percent", program="xdp_firewall") == 37.5
    # Row counts 5, 20, 10, 4, 0, 1 made cumulative; the kernel does not sum ns: no _sum.
    for le, expected in (("100", 5), ("500", 25), ("1000", 35), ("5000", 39), ("10000", 39), ("+Inf", 40)):
        assert value(s, "bpf_processing_latency_ns_bucket", program="xdp_firewall", le=le) == expected
    assert value(s, "bpf_processing_latency_ns_count", program="xdp_firewall") == 40
    assert "bpf_processing_latency_ns_sum" not in names(s)
    assert value(s, "bpfpipe_kernel_events_total", program="xdp_firewall", fate="sampled_out") == 2
    assert value(s, "bpfpipe_kernel_sampling_rate", program="xdp_firewall") == 4
    assert value(s, "bpfpipe_sampling_rate", stage="sampler") == 8
    assert value(s, "bpfpipe_breaker_state", stage="breaker", state="open") == 1
    assert value(s, "bpfpipe_breaker_state", stage="breaker", state="closed") == 0
    assert value(s, "bpfpipe_breaker_opened_total", stage="breaker") == 2
    assert value(s, "bpfpipe_breaker_fallback_events_total", stage="breaker") == 42


def test_a_closed_program_reports_its_last_values() -> None:
    pipe, exporter, program = kernel_pipeline()
    exporter.snapshot_text(pipe)
    program.stats["processed"] = 50  # read after detach by the reader's shutdown, then closed
    program.kernel_stats()
    program.closed = True
    s = parse(exporter.snapshot_text(pipe))
    assert value(s, "bpf_packets_processed_total", program="xdp_firewall") == 50
    assert value(s, "bpf_map_entries", program="xdp_firewall", map="rate_limit_state") == 12


def test_an_unreadable_program_does_not_break_the_scrape() -> None:
    pipe, exporter, program = kernel_pipeline()

    def broken() -> dict[str, tuple[int, int]]:
        raise OSError("map gone")

    program.map_usage = broken  # type: ignore[method-assign]
    s = parse(exporter.snapshot_text(pipe))
    assert value(s, "bpf_packets_processed_total", program="xdp_firewall") == 40
    assert "bpf_map_entries" not in names(s)


async def test_exposition_passes_promtool() -> None:
    require_tools(PROMTOOL)
    pipe, exporter, _ = kernel_pipeline()
    exporter.enhanced = True
    exporter.reload_statistics = lambda: SimpleNamespace(version=2, failures=0, last_reload_unix=1.0)
    with trio.move_on_after(5):
        await pipe.run()
    text = exporter.snapshot_text(pipe)
    assert_promtool_clean(text)


PROMTOOL_SEED_FINDING = "bpf_processing_latency_ns metric names should not contain abbreviated units"
"""promtool's one lint finding, on a name the seed fixes (exit 3 = lint only; 1 would be a parse error)."""


def assert_promtool_clean(text: str) -> None:
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    seed_name_present = "bpf_processing_latency_ns_bucket" in text
    assert findings == ([PROMTOOL_SEED_FINDING] if seed_name_present else []), findings
    assert result.returncode == (3 if seed_name_present else 0), findings


async def test_metrics_route_serves_the_registry() -> None:
    from pipeline.http import Request

    pipe, exporter, _ = kernel_pipeline()
    (route,) = exporter.routes(pipe)
    assert (route.method, route.path) == ("GET", "/metrics")
    response = await route.handler(Request("GET", "/metrics", {}, {}))
    assert response.status == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    assert value(parse(response.body.decode()), "bpf_packets_dropped_total", program="xdp_firewall") == 9


def test_attach_is_idempotent() -> None:
    pipe, exporter, _ = kernel_pipeline()
    breaker = pipe.nodes[2]
    timed = breaker.process  # type: ignore[attr-defined]
    exporter.attach(pipe)
    assert pipe.sink_observers.count(exporter.observe_sink_batch) == 1
    assert breaker.process is timed  # type: ignore[attr-defined]  # not wrapped twice


async def test_docs_metrics_md_lists_exactly_what_is_exported() -> None:
    """docs/metrics.md's tables against every family of a pipeline that has them all."""
    pipe, exporter, _ = kernel_pipeline()
    exporter.enforcer = SimpleNamespace(counts={"memory_pressure_on": 1}, evicted_entries=3)
    exporter.reload_statistics = lambda: SimpleNamespace(version=2, failures=0, last_reload_unix=1.5)
    exporter.enhanced = True
    exporter.events_by_type["exec"] = 1
    exporter.attach(pipe)
    exporter.stage_timers["sampler"].counts[0] += 1
    monitor = HealthMonitor(pipe.settings)
    monitor._pipe = pipe  # as its run() does: the checks are exported once there is a pipeline
    exporter.registry.register(monitor)
    exported: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(exporter.snapshot_text(pipe)):
        if family.name.startswith("process_"):
            continue
        labels = {k for sample in family.samples for k in sample.labels if k != "le"}
        exported[family.name] = (family.type, labels)

    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    documented: dict[str, tuple[str, set[str]]] = {}
    for match in re.finditer(r"^\| `(\w+)` \| (\w+) \|([^|]*)\|", doc, re.MULTILINE):
        name, kind, labels = match.groups()
        documented[name] = (kind, set(re.findall(r"`(\w+)`", labels)))
    assert set(documented) == set(exported), (
        f"undocumented: {sorted(set(exported) - set(documented))}; "
        f"not exported: {sorted(set(documented) - set(exported))}"
    )
    for name, (kind, labels) in exported.items():
        if not labels and kind in ("counter", "gauge") and name.startswith("bpfpipe_events"):
            labels = documented[name][1]  # the ledger's families have no samples in this pipeline
        assert documented[name] == (kind, labels), name
