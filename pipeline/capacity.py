"""Capacity planning: from a node's event rate, size and burstiness to a config.

Pure arithmetic over a :class:`Calibration` (costs measured by ``bench/calibrate.py``
on a reference machine) and a :class:`Workload`; ``bpfpipe capacity`` prints the
result. The method, with a worked example, is in docs/capacity.md; in short:

* **Records.** A ring record is the event plus the ring's 8-byte header, rounded up
  to 8 bytes: ``record = ceil8(event_bytes + 8)``.
* **Batches.** The reader wakes when ``wakeup_watermark`` of the ring is pending or
  ``max_batch_delay_ms`` has passed, whichever is first, so a batch holds
  ``max(1, min(rate * delay, watermark bytes / record))`` events.
* **CPU.** ``rate * per_event_us + batches_per_s * per_batch_us`` (both calibrated
  for the default chain: reader -> decoder -> sampler -> sink). The events one CPU
  budget can carry is the inverse; above it the adaptive sampler settles at
  ``sample_rate = ceil(rate / capacity)`` (1 in N kept, weight N).
* **Ring.** Holds what arrives between two reads (``rate * delay``) four times
  over — steady usage stays at or under 25 %, far from the 90 % alert — rounded up
  to a power-of-two number of pages, never below the default 64 pages.
* **Bursts.** A stall downstream (a slow sink, a compile, a GC pause) of
  ``burst_s`` seconds is ridden out in user space: the in-flight budget holds
  ``rate * burst_s`` events (and their bytes), the channels hold those batches.
* **Memory.** The agent's baseline resident size (calibrated: interpreter, numpy,
  bcc/LLVM after a compile) + the ring + twice the in-flight bytes (a batch and its
  copy in a stage), rounded up to 32 MiB: ``limits.max_memory_mb``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "Calibration",
    "Recommendation",
    "Workload",
    "load_calibration",
    "recommend",
    "render",
]

PAGE_BYTES = 4096
RING_HEADER_BYTES = 8
WEIGHT_BYTES = 8
MIN_RING_PAGES = 64
RING_HEADROOM = 4
MIN_CHANNEL = 4
MAX_CHANNEL = 4096
MEMORY_STEP_MB = 32


@dataclass(frozen=True, slots=True)
class Calibration:
    per_event_us: float
    """CPU per event in the default chain at large batches (marginal cost)."""
    per_batch_us: float
    """Fixed CPU per batch (wake-up, channel hops, bookkeeping)."""
    base_rss_mb: float
    """Resident memory of a running agent with a compiled program and no backlog."""
    measured_on: str = ""
    """When and where: ``bench/calibrate.py`` writes the date and the machine."""
    source: str = ""
    """The file this calibration was read from."""


@dataclass(frozen=True, slots=True)
class Workload:
    rate_per_s: float
    event_bytes: int
    burst_s: float = 1.0
    cpus: float = 1.0
    """CPU the agent may use, in cores."""
    max_batch_delay_ms: float = 100.0
    wakeup_watermark: float = 0.5
    """The reader's defaults (``stages.reader.RingBufferReaderConfig``)."""
    channels: int = 3
    """Channels in the chain (reader -> decoder -> sampler -> sink: 3)."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    record_bytes: int
    events_per_batch: float
    batches_per_s: float
    ring_buffer_pages: int
    ring_buffer_bytes: int
    channel_capacity: int
    max_inflight_events: int
    max_inflight_bytes: int
    max_memory_mb: int
    expected_cpu_cores: float
    capacity_per_s: float
    """Events per second the CPU budget carries."""
    sample_rate: int
    """1 in N the adaptive sampler settles at (1: no sampling)."""
    max_events_per_sec: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ceil8(n: float) -> int:
    return int(math.ceil(n / 8) * 8)


def _pow2_at_least(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def recommend(work: Workload, cal: Calibration) -> Recommendation:
    if work.rate_per_s <= 0 or work.event_bytes <= 0 or work.cpus <= 0 or work.burst_s < 0:
        raise ValueError("rate, event size and cpus must be positive, burst_s not negative")
    record = _ceil8(work.event_bytes + RING_HEADER_BYTES)
    delay_s = work.max_batch_delay_ms / 1000
    per_read = work.rate_per_s * delay_s

    ring_pages = max(MIN_RING_PAGES, _pow2_at_least(per_read * record * RING_HEADROOM / PAGE_BYTES))
    ring_bytes = ring_pages * PAGE_BYTES
    watermark_events = ring_bytes * work.wakeup_watermark / record
    per_batch = max(1.0, min(per_read, watermark_events))
    batches_per_s = work.rate_per_s / per_batch

    cpu_us_per_s = work.rate_per_s * cal.per_event_us + batches_per_s * cal.per_batch_us
    expected_cores = cpu_us_per_s / 1e6
    cost_per_event_us = cal.per_event_us + cal.per_batch_us / per_batch
    capacity = work.cpus * 1e6 / cost_per_event_us
    sample_rate = 1 if work.rate_per_s <= capacity else math.ceil(work.rate_per_s / capacity)
    delivered = work.rate_per_s / sample_rate

    inflight_events = max(1, math.ceil(delivered * work.burst_s))
    inflight_bytes = inflight_events * (work.event_bytes + WEIGHT_BYTES)
    # Sampling thins batches, it does not make fewer of them: a burst is this many batches.
    channel = math.ceil(batches_per_s * work.burst_s / work.channels)
    channel = min(MAX_CHANNEL, max(MIN_CHANNEL, channel))
    memory = cal.base_rss_mb + ring_bytes / 2**20 + 2 * inflight_bytes / 2**20
    memory_mb = int(math.ceil(memory / MEMORY_STEP_MB) * MEMORY_STEP_MB)
    return Recommendation(
        record_bytes=record,
        events_per_batch=round(per_batch, 1),
        batches_per_s=round(batches_per_s, 1),
        ring_buffer_pages=ring_pages,
        ring_buffer_bytes=ring_bytes,
        channel_capacity=channel,
        max_inflight_events=inflight_events,
        max_inflight_bytes=inflight_bytes,
        max_memory_mb=memory_mb,
        expected_cpu_cores=round(min(expected_cores, work.cpus), 3),
        capacity_per_s=round(capacity),
        sample_rate=sample_rate,
        max_events_per_sec=math.ceil(delivered),
    )


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration in ``path``, else the one shipped with the package (measured by
    ``bench/calibrate.py`` on the reference machine; its date is in ``measured_on``)."""
    if path is None:
        text = resources.files("pipeline").joinpath("calibration.json").read_text()
        where = "pipeline/calibration.json (shipped)"
    else:
        text = Path(path).read_text()
        where = str(path)
    data = json.loads(text)
    return Calibration(
        per_event_us=float(data["per_event_us"]),
        per_batch_us=float(data["per_batch_us"]),
        base_rss_mb=float(data["base_rss_mb"]),
        measured_on=f"{data.get('date', '?')} on {data.get('machine', '?')}",
        source=where,
    )


def render(work: Workload, cal: Calibration, rec: Recommendation) -> str:
    """The recommendation as the config keys to set, with the figures behind them."""
    sampled = (
        f"above the CPU budget: the adaptive sampler settles at 1 in {rec.sample_rate}"
        if rec.sample_rate > 1
        else "within the CPU budget: no sampling"
    )
    lines = [
        f"# bpfpipe capacity: {work.rate_per_s:g} events/s of {work.event_bytes} bytes, "
        f"bursts of {work.burst_s:g} s, {work.cpus:g} CPU",
        f"# calibration: {cal.source}, measured {cal.measured_on}",
        f"#   {cal.per_event_us:g} us/event + {cal.per_batch_us:g} us/batch, base RSS {cal.base_rss_mb:g} MB",
        f"# batches: {rec.events_per_batch:g} events each, {rec.batches_per_s:g}/s",
        f"# expected CPU: {rec.expected_cpu_cores:g} cores; "
        f"capacity {rec.capacity_per_s:,.0f} events/s ({sampled})",
        f"ring_buffer_size = {rec.ring_buffer_bytes}  # {rec.ring_buffer_pages} pages, "
        f"{rec.record_bytes}-byte records",
        "",
        "[channels]",
        f"capacity = {rec.channel_capacity}",
        "",
        "[limits]",
        f"max_inflight_events = {rec.max_inflight_events}",
        f"max_inflight_bytes = {rec.max_inflight_bytes}",
        f"max_memory_mb = {rec.max_memory_mb}",
        f"max_events_per_sec = {rec.max_events_per_sec}",
    ]
    return "\n".join(lines) + "\n"
