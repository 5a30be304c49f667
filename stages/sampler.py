"""AdaptiveSampler: sheds load by sampling when the pipeline downstream falls behind.

The decisions are made by the pure :class:`pipeline.sampling.SamplingPolicy`
(AIMD on an integer sampling rate ``N``, a ``max_events_per_sec`` cap and the
downstream's capacity learned under back-pressure; its docstring states the
guarantees). This stage only feeds it and applies its answer. It feeds:

* per batch: the fill of the channel it sends on, the batch's lag
  (``monotonic_ns() - read_time_ns``) and its weighted event count;
* per period: the events it sent, the events and batches the consumer took off
  that channel (sent minus still queued: the consumer's rate while it is the
  bottleneck is its capacity), and the weight of the events the source lost for
  want of room since the last period (``DRAINED`` and ``LOST_ON_RESERVE`` in the
  ledger).

The input rate: what arrives here plus what the source lost
-----------------------------------------------------------
Under back-pressure what *arrives* undercounts what is offered: a ring reader
drains or loses records that never get here. Adding the weight the source lost
(its outcomes carry the rate they were emitted at) gives what would arrive if the
pipeline kept up, which is what ``N`` acts on. We do not use the ledger's
``produced``: in a chain with filters before the sampler ("your stages") it also
counts the events those stages drop, which never reach the sampler whatever ``N``
is, so ``N`` would stay too high.
This assumes what we have — one source, one chain, every source loss upstream of
this stage; a second sampler further down sees the same losses and weighted
arrivals, so it measures the same ``r``. A source that blocks instead of losing
(the synthetic one) is undercounted while it is blocked; the policy allows for that.

Where the sampling happens (the kernel gate rule)
-------------------------------------------------
The rate ``N`` is the *total* reduction wanted, relative to what the kernel saw.
An event's weight ``w`` says how much of that the kernel's gate already did
(sources stamp the gate's rate at emission into ``batch.weights``). The sampler
takes only the remainder, per event: keep with probability ``min(1, w/N)`` and
set the weight of a kept event to ``max(w, N)``, i.e. ``w * max(1, N/w)``. So:

* a source without a gate (``w = 1``): 1 in ``N`` is kept in user space, weight ``N``;
* a source whose gate is attached (:meth:`AdaptiveSampler.attach_gate`) and has
  caught up (``w = N``): nothing is sampled here — the kernel takes the reduction;
* events the kernel emitted at an older, lower rate (still in flight after a
  change), or past what a gate can do: user space covers just the difference.

Weighted totals stay unbiased (``E[kept weight] = w``). Dropped events are recorded
as ``Outcome.USER_SAMPLED_OUT`` (reason ``adaptive sampling``). At ``N = 1`` and
whenever every weight is at least ``N``, batches pass untouched without drawing
random numbers.

Timing: a task in the stage runs one policy adjustment every ``adjust_period_s``
on trio's clock, also while the stage is blocked sending (that is when the fill is
most telling). Each change of ``N`` is logged once (logger ``bpfpipe.sampler``)
and pushed to the gate, if any.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Protocol

import msgspec
import numpy as np
import trio

from pipeline import Batch, BatchReceiver, BatchSender, Outcome, Stage, StageContext
from pipeline._channel import Edge
from pipeline.accounting import Ledger
from pipeline.sampling import RateChange, SamplingParams, SamplingPolicy

__all__ = ["AdaptiveSampler", "AdaptiveSamplerConfig", "SamplerStatistics", "SamplingGate"]

log = logging.getLogger("bpfpipe.sampler")

SAMPLED_OUT_REASON = "adaptive sampling"


class SamplingGate(Protocol):
    """The kernel side of sampling: a source with an in-kernel gate provides one."""

    def set_sample_rate(self, n: int) -> None:
        """From now on the kernel emits 1 event in ``n`` (and stamps weight ``n`` on it)."""


class AdaptiveSamplerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Defaults suit a 16-batch channel at tens of thousands of events/s."""

    min_sample_rate: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Always keep at most 1 event in this many (1 = sample only under pressure)."""
    max_sample_rate: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Never keep fewer than 1 event in this many, however bad the pressure."""
    max_events_per_sec: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Cap on the rate of events this stage sends on (estimated over each period); 0 = no cap;
    unset = the pipeline's ``limits.max_events_per_sec``."""
    adjust_period_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    """How often the rate is reconsidered."""
    high_fill: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.75
    """Mean fill of the downstream channel at or above which the keep fraction halves."""
    low_fill: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.25
    """Mean fill at or below which (with low lag) the keep fraction recovers."""
    high_lag_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Mean lag (now - read time) at or above which the keep fraction falls; 0 ignores lag."""
    low_lag_s: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    decrease_factor: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    """Keep-fraction multiplier per period under pressure (0.5: halve)."""
    increase_step: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    """Keep fraction added per period of relief (0.05: N=1000 back to 1 within 11 periods)."""
    cap_hysteresis: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    """Headroom below the cap required before the cap lets N fall again; also the headroom
    left below a learned downstream capacity."""
    capacity_growth: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.02
    """Growth of the learned downstream capacity per period of relief once the hold is over
    (probing for a faster consumer); 0 = never probe."""
    capacity_hold_periods: Annotated[int, msgspec.Meta(ge=1)] = 20
    """Relief periods after a capacity measurement before it grows (20: 10 s); doubled, up to
    8 times, while measurements agree, so a steady consumer is probed about once per 80 s."""
    seed: int | None = None
    """Seed of the user-space sampling generator; unset draws one from the OS."""

    def __post_init__(self) -> None:
        self.params()  # cross-field checks; msgspec reports the ValueError as a config error

    def params(self) -> SamplingParams:
        return SamplingParams(
            min_sample_rate=self.min_sample_rate,
            max_sample_rate=self.max_sample_rate,
            period_s=self.adjust_period_s,
            high_fill=self.high_fill,
            low_fill=self.low_fill,
            high_lag_s=self.high_lag_s,
            low_lag_s=self.low_lag_s,
            decrease_factor=self.decrease_factor,
            increase_step=self.increase_step,
            max_events_per_sec=self.max_events_per_sec or 0.0,
            cap_hysteresis=self.cap_hysteresis,
            capacity_growth=self.capacity_growth,
            capacity_hold_periods=self.capacity_hold_periods,
        )


@dataclass(frozen=True, slots=True)
class SamplerStatistics:
    sample_rate: int
    """The current N (keep 1 in N)."""
    rate_changes: int
    gate_attached: bool
    user_sampled_out_events: int
    last_change: RateChange | None
    capacity_per_s: float | None = None
    """The learned capacity of the consumer downstream, events/s (None: not learned)."""
    capacity_measurements: int = 0


LOST_UPSTREAM = (Outcome.DRAINED, Outcome.LOST_ON_RESERVE)
"""Outcomes of events the source lost for want of room: they count as offered."""


@dataclass(frozen=True, slots=True)
class _Flows:
    """Running totals the policy takes per period, as differences."""

    sent_events: int = 0
    consumed_events: int = 0
    consumed_batches: int = 0
    lost_upstream: float = 0.0

    @classmethod
    def read(cls, edge: Edge, sending: int, ledger: Ledger) -> _Flows:
        # A batch being sent counts in queued_events already, and not yet in sent_events.
        snap = ledger.snapshot()
        return cls(
            sent_events=edge.sent_events,
            consumed_events=edge.sent_events + sending - edge.queued_events,
            consumed_batches=edge.sent_batches - edge.depth,
            lost_upstream=sum(snap.total_weight(o) for o in LOST_UPSTREAM),
        )

    def __sub__(self, before: _Flows) -> _Flows:
        return _Flows(
            self.sent_events - before.sent_events,
            self.consumed_events - before.consumed_events,
            self.consumed_batches - before.consumed_batches,
            self.lost_upstream - before.lost_upstream,
        )


class AdaptiveSampler(Stage):
    Config = AdaptiveSamplerConfig
    config: AdaptiveSamplerConfig

    def __init__(self, config: AdaptiveSamplerConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        cap = config.max_events_per_sec
        if cap is None:
            cap = float(ctx.settings.limits.max_events_per_sec)
        self._params = dataclasses.replace(config.params(), max_events_per_sec=cap)
        self.policy = SamplingPolicy(self._params, now=0.0)
        self.gate: SamplingGate | None = None
        self._rng = np.random.default_rng(config.seed)
        self._sampled_out = 0
        self._sending = 0
        """Events in the batch being sent right now (0: none)."""
        self._flows = _Flows()
        self._last_change: RateChange | None = None

    @property
    def sample_rate(self) -> int:
        return self.policy.rate

    def attach_gate(self, gate: SamplingGate) -> None:
        """Let the kernel take the reduction: ``gate.set_sample_rate(N)`` is called now
        and on every change of N. Call before or while the pipeline runs."""
        self.gate = gate
        self._push(self.policy.rate)

    def statistics(self) -> SamplerStatistics:
        return SamplerStatistics(
            sample_rate=self.policy.rate,
            rate_changes=self.policy.changes,
            gate_attached=self.gate is not None,
            user_sampled_out_events=self._sampled_out,
            last_change=self._last_change,
            capacity_per_s=self.policy.capacity_per_s,
            capacity_measurements=self.policy.capacity.measurements,
        )

    async def run(
        self,
        rx: BatchReceiver,
        tx: BatchSender,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        policy = self.policy = SamplingPolicy(self._params, now=trio.current_time())
        self._push(policy.rate)
        edge = tx.edge
        self._flows = _Flows.read(edge, self._sending, self.ctx.ledger)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._adjust_loop, edge)
            task_status.started()
            async for batch in rx:
                lag_s = (time.monotonic_ns() - batch.read_time_ns) / 1e9
                policy.observe(fill=edge.fill, lag_s=lag_s, weighted_events=batch.weight_sum)
                out = self.sample(batch)
                if out is not None:
                    self._sending = len(out)
                    try:
                        await tx.send(out)
                    finally:
                        self._sending = 0
            nursery.cancel_scope.cancel()

    def sample(self, batch: Batch) -> Batch | None:
        """Apply the current rate to one batch (vectorised); record what it drops."""
        n = self.policy.rate
        weights = batch.weights
        if n == 1 or len(batch) == 0 or weights.min() >= n:
            return batch
        keep = self._rng.random(len(batch)) * n < weights
        kept = int(np.count_nonzero(keep))
        dropped = len(batch) - kept
        if dropped:
            self._sampled_out += dropped
            self.ctx.record(
                Outcome.USER_SAMPLED_OUT,
                dropped,
                float(weights[~keep].sum()),
                reason=SAMPLED_OUT_REASON,
            )
        if not kept:
            return None
        return batch.replace(events=batch.events[keep], weights=np.maximum(weights[keep], float(n)))

    async def _adjust_loop(self, edge: Edge) -> None:
        policy = self.policy
        while True:
            await trio.sleep_until(policy.due_at)
            flows = _Flows.read(edge, self._sending, self.ctx.ledger)
            period, self._flows = flows - self._flows, flows
            policy.observe(
                fill=edge.fill,
                sent_events=period.sent_events,
                consumed_events=period.consumed_events,
                consumed_batches=period.consumed_batches,
                lost_upstream=period.lost_upstream,
            )
            change = policy.tick(trio.current_time())
            if change is not None:
                self._changed(change)

    def _changed(self, change: RateChange) -> None:
        self._last_change = change
        log.info(
            "sampling rate %d -> %d (%s)",
            change.old_rate,
            change.new_rate,
            change.reason,
            extra={
                "stage": self.ctx.name,
                "fill": round(change.fill, 3),
                "lag_s": round(change.lag_s, 3),
                "input_per_s": round(change.input_per_s),
                "capacity_per_s": None if change.capacity_per_s is None else round(change.capacity_per_s),
            },
        )
        self._push(change.new_rate)

    def _push(self, rate: int) -> None:
        if self.gate is None:
            return
        try:
            self.gate.set_sample_rate(rate)
        except Exception as exc:
            # User space still covers the difference: the weights say what the kernel did.
            self.ctx.error(exc, "set_sample_rate()")
