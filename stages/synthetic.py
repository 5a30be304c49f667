"""A deterministic synthetic source: same batch form as the kernel, no kernel needed.

Events have a strictly increasing ``seq`` (so tests can check order and
exactly-once delivery); ``pid``, ``cpu``, ``type`` and ``value`` come from a
seeded generator, so a given seed always yields the same stream. ``ts_ns`` is
CLOCK_MONOTONIC, like the kernel's ``bpf_ktime_get_ns``, and batches are named
``"synthetic"`` (``Batch.event_name``), so exporters treat them as kernel events. The rate is
enforced against ``trio.current_time()`` (works under trio's autojump clock),
optionally as a square-wave burst pattern.

Back-pressure blocks this source (it stands in for a producer that waits); it
never lets credit pile up beyond one batch, so it does not burst to catch up.

It is a :class:`pipeline.HeartbeatSource`: ``trigger_heartbeat(marker)`` makes it
send, at once (or as soon as back-pressure lets it), a one-event batch named
``"heartbeat"`` (:data:`HEARTBEAT_DTYPE`: ``ts_ns``, ``marker``, ``tgid``), counted
as produced like any event.
"""

from __future__ import annotations

import math
import os
import time
from typing import Annotated, Any

import msgspec
import numpy as np
import trio

from pipeline import HEARTBEAT_EVENT, Batch, BatchSender, Source, StageContext

SYNTHETIC_DTYPE = np.dtype(
    [
        ("ts_ns", "<u8"),
        ("seq", "<u8"),
        ("pid", "<u4"),
        ("cpu", "<u2"),
        ("type", "<u2"),
        ("value", "<u8"),
    ]
)


EVENT_NAME = "synthetic"
"""The ``event_name`` of every batch this source sends (but heartbeats)."""

HEARTBEAT_DTYPE = np.dtype([("ts_ns", "<u8"), ("marker", "<u8"), ("tgid", "<u4")])
"""A heartbeat event: the fields the kernel's heartbeat has beyond its header."""


class SyntheticConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    rate_per_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Events per second; 0 = as fast as downstream accepts."""
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 1024
    total_events: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Stop after this many events; 0 = run until stopped."""
    burst_factor: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Rate multiplier during the 'on' part of each burst period."""
    burst_period_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Length of one burst cycle; 0 = no bursts."""
    burst_duty: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """Fraction of each cycle spent at the burst rate."""
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Seed of the generator (numpy's ``default_rng`` takes a non-negative integer)."""
    max_tick_s: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    """Longest wait between batches at low rates (bounds latency)."""


class SyntheticSource(Source):
    Config = SyntheticConfig
    config: SyntheticConfig

    def __init__(self, config: SyntheticConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        size = config.batch_size
        rng = np.random.default_rng(config.seed)
        template = np.zeros(size, dtype=SYNTHETIC_DTYPE)
        template["pid"] = rng.integers(1, 1 << 22, size)
        template["cpu"] = rng.integers(0, os.cpu_count() or 1, size)
        template["type"] = rng.integers(0, 3, size)
        template["value"] = rng.integers(0, 1 << 32, size)
        self._template = template
        self._offsets = np.arange(size, dtype=np.uint64)
        self._heartbeats: list[int] = []
        self._asked = trio.Event()
        """Set by ``trigger_heartbeat``: ends the source's wait for its next batch."""
        self.blocked_s = 0.0
        """Seconds spent waiting for room downstream (channel or in-flight budget)."""
        self.throttled_events = 0.0
        """Events the rate called for and the source never made because back-pressure held
        it: its credit stops at one batch, and what a wait for room pushed past that is gone.
        (A short wait costs nothing: the credit it left unused is still there.) Counted when
        the source next earns credit, so a span spent waiting shows up when the wait ends.
        Of what a span lost, at most the time it spent waiting times the rate counts here
        (:func:`split_lost`); the rest is late."""
        self.late_events = 0.0
        """The same, lost while the source was not waiting for room: it did not run (the
        event loop busy elsewhere, or the process not scheduled). With bursts, a span is
        credited at the rate at its end, so one crossing a burst edge is counted at the
        burst's rate (or the base rate) throughout."""

    def trigger_heartbeat(self, marker: int) -> None:
        """Send a heartbeat carrying ``marker`` before the next batch (never blocks)."""
        self._heartbeats.append(marker)
        self._asked.set()

    async def _nap(self, seconds: float) -> None:
        """Sleep until the next batch is due, or until a heartbeat is asked for."""
        with trio.move_on_after(seconds):
            await self._asked.wait()
        if self._asked.is_set():
            self._asked = trio.Event()

    def rate_at(self, elapsed_s: float) -> float:
        cfg = self.config
        if cfg.burst_period_s > 0 and (elapsed_s % cfg.burst_period_s) < cfg.burst_duty * cfg.burst_period_s:
            return cfg.rate_per_s * cfg.burst_factor
        return cfg.rate_per_s

    async def _send_heartbeats(self, tx: BatchSender, batch_no: int) -> tuple[int, float]:
        """Send the heartbeats asked for; the next batch number, and how long it waited for room."""
        n = len(self._heartbeats)
        waited = await self._wait_room(tx, n, n * (HEARTBEAT_DTYPE.itemsize + 8))
        markers, self._heartbeats = self._heartbeats[:n], self._heartbeats[n:]
        events: np.ndarray[Any, Any] = np.zeros(len(markers), dtype=HEARTBEAT_DTYPE)
        events["ts_ns"] = time.monotonic_ns()
        events["marker"] = markers
        events["tgid"] = os.getpid()
        self.ctx.produced(len(markers))
        tx.send_nowait(Batch(events, source=self.ctx.name, seq=batch_no, event_name=HEARTBEAT_EVENT))
        return batch_no + 1, waited

    async def _wait_room(self, tx: BatchSender, events: int, nbytes: int) -> float:
        """``tx.wait_room``; the seconds it waited (0.0 if there was room), added to ``blocked_s``."""
        waited_from = trio.current_time()
        if not await tx.wait_room(events, nbytes):
            return 0.0
        waited = trio.current_time() - waited_from
        self.blocked_s += waited
        return waited

    def _make(self, n: int, seq: int) -> np.ndarray:
        events = self._template[:n].copy()
        events["seq"] = self._offsets[:n] + np.uint64(seq)
        events["ts_ns"] = time.monotonic_ns()
        return events

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        size = cfg.batch_size
        remaining = cfg.total_events or math.inf
        seq = 0
        batch_no = 0
        start = last = trio.current_time()
        credit = 0.0
        waited = 0.0  # seconds the source waited for room since the credit was last earned
        self.ctx.publish(self)  # a HeartbeatSource, for the health monitor
        task_status.started()
        while remaining > 0:
            if self._heartbeats:
                batch_no, heartbeat_waited = await self._send_heartbeats(tx, batch_no)
                waited += heartbeat_waited
            want = int(min(size, remaining))
            if cfg.rate_per_s > 0:
                now = trio.current_time()
                rate = self.rate_at(now - start)
                earned = credit + (now - last) * rate
                if earned > size:
                    throttled, late = split_lost(earned - size, waited, rate)
                    self.throttled_events += throttled
                    self.late_events += late
                # the epsilon absorbs float rounding that could otherwise leave credit a
                # hair short forever
                credit = min(earned + 1e-9, float(size))
                last = now
                waited = 0.0
                if credit < want:
                    if rate <= 0:
                        await self._nap(cfg.max_tick_s)
                        continue
                    if credit < 1:
                        await self._nap(min(max((want - credit) / rate, 1e-4), cfg.max_tick_s))
                        continue
                    want = int(credit)
                credit -= want
            # Wait for room first, then make, count and send with no checkpoint between:
            # a graceful stop cancels the wait, never a batch already counted as produced.
            waited += await self._wait_room(tx, want, want * (SYNTHETIC_DTYPE.itemsize + 8))  # + weights
            events = self._make(want, seq)
            seq += want
            remaining -= want
            self.ctx.produced(want)
            tx.send_nowait(Batch(events, source=self.ctx.name, seq=batch_no, event_name=EVENT_NAME))
            batch_no += 1


def split_lost(lost: float, waited_s: float, rate_per_s: float) -> tuple[float, float]:
    """Events a span lost past the credit cap, as (throttled, late): back-pressure held the
    source for ``waited_s`` of the span, which at ``rate_per_s`` is at most that many events;
    the rest were lost while it was not waiting (it did not run). Pure."""
    throttled = min(lost, max(0.0, waited_s) * rate_per_s)
    return throttled, lost - throttled
