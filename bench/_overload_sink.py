"""A deliberately slow sink for ``bench/overload.py``: it accepts at most ``events_per_s``.

Capacity model: writing ``n`` events occupies the sink for ``n / events_per_s``
seconds, a token bucket whose idle time is saved up to ``min_sleep_s`` only, so
over any interval it delivers at most ``events_per_s * (interval + min_sleep_s)
+ one batch``. The sink sleeps only once it owes at least ``min_sleep_s``: a
sleep per small batch would be rounded up by the event loop's timer (epoll
counts whole milliseconds) and cap the sink at about a thousand *batches* per
second, whatever their size, which is not the capacity we mean to model. For
the same reason the next batch may start up to ``min_sleep_s`` before it is
handed over: each sleep ends up to a millisecond late (later on a busy CPU), and
without that credit a busy sink lost that time on every batch — measured
2026-12-03 with 1024-event batches, 47.4 k/s of a nominal 50 k/s.
That stands in for an exporter with a fixed per-event cost, e.g. a network
write. It also measures the age of what it delivers, which is what overload
does to a pipeline that does not shed load: the age grows with the queues.

Loaded by the benchmark through the config, as ``_overload_sink:RateLimitedSink``
(``bench/`` is on ``sys.path`` when the benchmark runs).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
import trio

from pipeline import Batch, BatchSink, StageContext


class RateLimitedSinkConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    events_per_s: Annotated[float, msgspec.Meta(gt=0)] = 50_000.0
    """The sink's capacity."""
    age_clock: Literal["read_time", "kernel_ts"] = "read_time"
    """``read_time``: age since the batch left its origin (``batch.read_time_ns``);
    ``kernel_ts``: age of the oldest event in the batch by its ``ts_ns``
    (``bpf_ktime_get_ns``, CLOCK_MONOTONIC), which includes the time spent in the ring."""
    min_sleep_s: Annotated[float, msgspec.Meta(ge=0)] = 0.005
    """Owed time below which the sink does not sleep (it only yields)."""


class RateLimitedSink(BatchSink):
    Config = RateLimitedSinkConfig
    config: RateLimitedSinkConfig

    def __init__(self, config: RateLimitedSinkConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._free_at = 0.0
        self.batches = 0
        self.busy_s = 0.0
        """Time spent 'writing' (sleeping for capacity)."""
        self.age_sum_s = 0.0
        """Sum over batches of the batch's age at delivery (see ``age_clock``)."""
        self.age_max_s = 0.0

    async def write(self, batch: Batch) -> None:
        n = len(batch)
        now = trio.current_time()
        start = max(now - self.config.min_sleep_s, self._free_at)
        cost = n / self.config.events_per_s
        self._free_at = start + cost
        self.busy_s += cost
        if self._free_at - now >= self.config.min_sleep_s:
            await trio.sleep_until(self._free_at)
        else:
            await trio.lowlevel.checkpoint()
        if self.config.age_clock == "kernel_ts" and n and "ts_ns" in (batch.events.dtype.names or ()):
            oldest = int(batch.events["ts_ns"].min())
        else:
            oldest = batch.read_time_ns
        age_s = max(0, time.monotonic_ns() - oldest) / 1e9
        self.batches += 1
        self.age_sum_s += age_s
        if age_s > self.age_max_s:
            self.age_max_s = age_s
