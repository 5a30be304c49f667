"""AdaptiveSampler: sheds load by sampling when the pipeline downstream falls behind.

The decisions are made by the pure :class:`pipeline.sampling.SamplingPolicy`
(AIMD on an integer sampling rate ``N``, a ``max_events_per_sec`` cap and the
downstream's capacity learned under back-pressure; its docstring states the
guarantees). This stage only feeds it and applies its answer. It feeds:

* per batch: the fill of the channel it sends on, the batch's lag
  (``monotonic_ns() - read_time_ns``), its weighted event count and the time since
  the batch before it arrived (what it gathered over: so the input rate has no
  batch's worth of error per period);
* per period: the events it sent, the events and batches the consumer took off
  that channel (``EdgeStatistics.received_*``: the consumer's rate while it is the
  bottleneck is its capacity; ``completed_events`` between its takes measure that
  rate without a partial batch), the times it found that channel full and waited
  (``EdgeStatistics.full_waits``: what ends a probe for more capacity, and marks a
  period whose input a blocking source may have undercounted), and the weight of the
  events the source lost for want of room since the last period (``DRAINED`` and
  ``LOST_ON_RESERVE`` in the ledger).

The input rate: what arrives here plus what the source lost
-----------------------------------------------------------
Under back-pressure what *arrives* undercounts what is offered: a ring reader
drains or loses records that never get here. Adding the weight the source lost
(its outcomes carry the rate they were emitted at) gives what would arrive if the
pipeline kept up, which is what ``N`` acts on. We do not use the ledger's
``produced``: in a chain with filters before the sampler ("your stages") it also
counts the events those stages drop, which never reach the sampler whatever ``N``
is, so ``N`` would stay too high.
Only losses recorded by the nodes upstream of this stage (``ctx.upstream``) count:
another chain's source sharing the ledger feeds a different input. A second sampler
further down sees the same losses and weighted arrivals, so it measures the same
``r``. Every gate published upstream is attached and gets the same ``N``. A source
that blocks instead of losing (the synthetic one) is undercounted while it is blocked;
the policy allows for that.

Where the sampling happens (the kernel gate rule)
-------------------------------------------------
The rate ``N`` is the *total* reduction wanted, relative to what the kernel saw;
the stage samples at the policy's ``exact_rate`` ``x`` — ``N`` itself, or a
fraction below it where a limit (the cap, the learned capacity) sets ``N``
(``pipeline.sampling``, "Fractional rates"). An event's weight ``w`` says how much
of that the kernel's gate already did (sources stamp the gate's rate at emission
into ``batch.weights``). The sampler takes only the remainder, per event: keep with
probability ``min(1, w/x)`` and set the weight of a kept event to ``max(w, x)``,
i.e. ``w * max(1, x/w)``. So:

* a source without a gate (``w = 1``): 1 in ``x`` is kept in user space, weight ``x``;
* a source whose gate is attached (:meth:`AdaptiveSampler.attach_gate`) and has
  caught up: the gate runs at the whole part ``⌊x⌋`` (``w = ⌊x⌋``), and here
  ``⌊x⌋/x`` of the events are kept — all of them when ``x`` is whole (``x = N``);
* events the kernel emitted at an older, lower rate (still in flight after a
  change), or past what a gate can do: user space covers just the difference.

Weighted totals stay unbiased (``E[kept weight] = w``). Dropped events are recorded
as ``Outcome.USER_SAMPLED_OUT`` (reason ``adaptive sampling``). At ``x = 1`` and
whenever every weight is at least ``x``, batches pass untouched without drawing
random numbers.

The rate cap from the first event
---------------------------------
``N`` acts on measured rates, so it cannot hold ``max_events_per_sec`` before its
first adjustment. A :class:`pipeline.sampling.RateCapBucket` (a period's worth of
burst) therefore trims what ``N`` keeps, per batch: it keeps each event with the
batch's probability ``q`` and divides the kept ones' weights by ``q``, so weighted
totals stay unbiased; what it drops is ``USER_SAMPLED_OUT`` (reason ``adaptive
sampling``; ``SamplerStatistics.rate_capped_events`` counts them apart). A batch
arriving the very instant the bucket emptied (``q = 0``) has no event to carry its
weight: the next events that pass carry it. Once ``N`` holds the cap the bucket is
(nearly) full and batches pass it untouched.

Heartbeat batches (``pipeline.HEARTBEAT_EVENT``) are sent on as they come: never
sampled, never capped, and not fed to the policy.

Timing: a task in the stage runs one policy adjustment every ``adjust_period_s``
on trio's clock, also while the stage is blocked sending (that is when the fill is
most telling). Each change of ``N`` is logged once (logger ``bpfpipe.sampler``);
each change of ``⌊x⌋`` is pushed to the gates, if any.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import trio

import pipeline
from pipeline import (
    HEARTBEAT_EVENT,
    Batch,
    BatchReceiver,
    BatchSender,
    EdgeStatistics,
    Outcome,
    SamplingGate,
    Stage,
    StageContext,
)
from pipeline.accounting import LedgerSnapshot
from pipeline.sampling import RateCapBucket, RateChange, SamplingParams, SamplingPolicy

__all__ = ["AdaptiveSampler", "AdaptiveSamplerConfig", "SamplerStatistics"]

log = logging.getLogger("bpfpipe.sampler")

SAMPLED_OUT_REASON = "adaptive sampling"


class AdaptiveSamplerConfig(SamplingParams, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The policy's knobs (:class:`pipeline.sampling.SamplingParams`: one definition of
    each, with its default and bounds), and the seed of the user-space draw. Defaults
    suit a 16-batch channel at tens of thousands of events/s."""

    seed: int | None = None
    """Seed of the user-space sampling generator; unset draws one from the OS."""


@dataclass(frozen=True, slots=True)
class SamplerStatistics:
    sample_rate: int
    """The current N (keep 1 in N)."""
    exact_rate: float
    """The rate sampled at, in ``[N - 1, N]``: ``N`` except where a limit (the cap, the learned
    capacity) sets it (``pipeline.sampling``, "Fractional rates")."""
    gate_rate: int
    """The rate pushed to the kernel gates: ``⌊exact_rate⌋``; user space takes the rest."""
    rate_changes: int
    gate_attached: bool
    user_sampled_out_events: int
    last_change: RateChange | None
    capacity_per_s: float | None = None
    """The learned capacity of the consumer downstream, events/s (None: not learned)."""
    capacity_measurements: int = 0
    rate_capped_events: int = 0
    """Of ``user_sampled_out_events``'s kind, those the rate cap's bucket dropped (not counted there)."""


LOST_UPSTREAM = (Outcome.DRAINED, Outcome.LOST_ON_RESERVE)
"""Outcomes of events the source lost for want of room: they count as offered."""


@dataclass(frozen=True, slots=True)
class _Flows:
    """Running totals the policy takes per period, as differences."""

    sent_events: int = 0
    consumed_events: int = 0
    consumed_batches: int = 0
    completed_events: int = 0
    last_take_s: float = 0.0
    lost_upstream: float = 0.0
    full_waits: int = 0

    @classmethod
    def read(cls, edge: EdgeStatistics, ledger: LedgerSnapshot, upstream: tuple[str, ...]) -> _Flows:
        return cls(
            sent_events=edge.sent_events,
            consumed_events=edge.received_events,
            consumed_batches=edge.received_batches,
            completed_events=edge.completed_events,
            last_take_s=edge.last_take_s,
            lost_upstream=ledger.total_weight(*LOST_UPSTREAM, stages=upstream),
            full_waits=edge.full_waits,
        )

    def __sub__(self, before: _Flows) -> _Flows:
        return _Flows(
            self.sent_events - before.sent_events,
            self.consumed_events - before.consumed_events,
            self.consumed_batches - before.consumed_batches,
            self.completed_events - before.completed_events,
            self.last_take_s - before.last_take_s,
            self.lost_upstream - before.lost_upstream,
            self.full_waits - before.full_waits,
        )


class AdaptiveSampler(Stage):
    Config = AdaptiveSamplerConfig
    config: AdaptiveSamplerConfig

    @classmethod
    def resolve_config(
        cls, config: AdaptiveSamplerConfig, settings: pipeline.Config
    ) -> AdaptiveSamplerConfig:
        """An unset ``max_events_per_sec`` is the pipeline's ``limits.max_events_per_sec``."""
        if config.max_events_per_sec is not None:
            return config
        return msgspec.structs.replace(config, max_events_per_sec=float(settings.limits.max_events_per_sec))

    def __init__(self, config: AdaptiveSamplerConfig, ctx: StageContext) -> None:
        # Built from a NodeSpec rather than from config, the cap may still be unset.
        config = self.resolve_config(config, ctx.settings)
        super().__init__(config, ctx)
        self.policy = SamplingPolicy(config, now=0.0)
        self.gates: list[SamplingGate] = []
        self._rng = np.random.default_rng(config.seed)
        self._sampled_out = 0
        self._capped_out = 0
        self._carried_weight = 0.0
        self._bucket = self._new_bucket(now=0.0)
        self._flows = _Flows()
        self._last_change: RateChange | None = None
        self._gate_rate = self.policy.gate_rate

    def _new_bucket(self, *, now: float) -> RateCapBucket | None:
        cap = self.config.cap_per_s
        if cap <= 0:
            return None
        # A period's worth of burst: the policy's N keeps the mean under the cap, the bucket
        # only trims what comes before N has been set, or a burst beyond a period's worth.
        burst = max(1.0, cap * self.config.adjust_period_s)
        return RateCapBucket(cap, burst, now=now, phase=float(self._rng.random()))

    @property
    def sample_rate(self) -> int:
        return self.policy.rate

    @property
    def gate(self) -> SamplingGate | None:
        """The first attached gate (None: none attached)."""
        return self.gates[0] if self.gates else None

    def attach_gate(self, gate: SamplingGate) -> None:
        """Let the kernel take the reduction: ``gate.set_sample_rate(N)`` is called now
        and on every change of N. Call before or while the pipeline runs; the runtime
        attaches the gate of every source upstream of this stage."""
        self.gates.append(gate)
        self._push_to(gate, self._gate_rate)

    def reconfigure(self, config: AdaptiveSamplerConfig) -> None:
        """Take new bounds and knobs while running (a config reload): the policy uses them
        from its next adjustment, N is clamped into the new ``[min_sample_rate,
        max_sample_rate]`` at once (and pushed to the gates), the rate cap's bucket is
        rebuilt if the cap changed, and a new ``seed`` reseeds the draw. What the policy
        has learned (the consumer's capacity) is kept."""
        if config.max_events_per_sec is None:
            config = self.resolve_config(config, self.ctx.settings)
        old, self.config = self.config, config
        policy = self.policy
        policy.params = policy.capacity.params = config
        if config.seed != old.seed:
            self._rng = np.random.default_rng(config.seed)
        if (config.cap_per_s, config.adjust_period_s) != (old.cap_per_s, old.adjust_period_s):
            self._bucket = self._new_bucket(now=trio.current_time())
        rate = min(config.max_sample_rate, max(policy.rate, config.min_sample_rate))
        if rate != policy.rate:
            log.info("sampling rate %d -> %d (new bounds)", policy.rate, rate, extra={"stage": self.ctx.name})
            policy.rate = rate
            self._sync_gates()

    def statistics(self) -> SamplerStatistics:
        return SamplerStatistics(
            sample_rate=self.policy.rate,
            exact_rate=self.policy.exact_rate,
            gate_rate=self._gate_rate,
            rate_changes=self.policy.changes,
            gate_attached=bool(self.gates),
            user_sampled_out_events=self._sampled_out,
            last_change=self._last_change,
            capacity_per_s=self.policy.capacity_per_s,
            capacity_measurements=self.policy.capacity.measurements,
            rate_capped_events=self._capped_out,
        )

    async def run(
        self,
        rx: BatchReceiver,
        tx: BatchSender,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        now = trio.current_time()
        policy = self.policy = SamplingPolicy(self.config, now=now)
        self._bucket = self._new_bucket(now=now)
        self._gate_rate = policy.gate_rate
        self._push(self._gate_rate)
        self._flows = self._read_flows(tx)
        last_arrival = now  # the first batch holds what came since the start
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._adjust_loop, tx)
            task_status.started()
            async for batch in rx:
                if batch.event_name == HEARTBEAT_EVENT:  # never sampled, and no load
                    await tx.send(batch)
                    continue
                lag_s = (time.monotonic_ns() - batch.read_time_ns) / 1e9
                # The batch holds what its source gathered since the batch before it.
                now = trio.current_time()
                span_s, last_arrival = now - last_arrival, now
                policy.observe(
                    fill=tx.fill, lag_s=lag_s, weighted_events=batch.weight_sum, weighted_span_s=span_s
                )
                out = self.sample(batch, now)
                if out is not None:
                    await tx.send(out)
            nursery.cancel_scope.cancel()

    def sample(self, batch: Batch, now: float) -> Batch | None:
        """Apply the current rate, then the rate cap's bucket, to one batch arriving at
        ``now`` (trio's clock) (vectorised); record what they drop."""
        out = self._sample_rate(batch)
        if out is None or self._bucket is None:
            return out
        return self._cap_rate(out, now)

    def _sample_rate(self, batch: Batch) -> Batch | None:
        n = self.policy.exact_rate
        weights = batch.weights
        if n <= 1 or len(batch) == 0 or weights.min() >= n:
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

    def _cap_rate(self, batch: Batch, now: float) -> Batch | None:
        assert self._bucket is not None
        q, keep = self._bucket.keep(len(batch), now)
        if keep is None:
            return self._carry(batch, batch.events, batch.weights)
        weights = batch.weights
        kept = int(np.count_nonzero(keep))
        dropped = len(batch) - kept
        self._capped_out += dropped
        # Sampled out (same outcome and reason as N's draws; statistics count them apart):
        # each was kept with probability q, and the kept ones carry the rest (weight / q).
        self.ctx.record(
            Outcome.USER_SAMPLED_OUT, dropped, float(weights[~keep].sum()), reason=SAMPLED_OUT_REASON
        )
        if q == 0:
            # The bucket emptied this very instant: nothing here can carry the weight, so the
            # next events that pass carry it.
            self._carried_weight += float(weights.sum())
        if not kept:
            return None
        return self._carry(batch, batch.events[keep], weights[keep] / q)

    def _carry(self, batch: Batch, events: npt.NDArray[Any], weights: npt.NDArray[np.float64]) -> Batch:
        """``batch`` with these events and weights, the weights scaled up by any weight carried
        from ``q = 0`` batches."""
        if self._carried_weight and len(weights):
            weights = weights * (1.0 + self._carried_weight / float(weights.sum()))
            self._carried_weight = 0.0
        if events is batch.events and weights is batch.weights:
            return batch
        return batch.replace(events=events, weights=weights)

    def _read_flows(self, tx: BatchSender) -> _Flows:
        # Losses of the sources upstream only: with several chains in one ledger, or
        # losses further down, another source's drops say nothing about this input.
        return _Flows.read(tx.statistics(), self.ctx.ledger.snapshot(), self.ctx.upstream)

    async def _adjust_loop(self, tx: BatchSender) -> None:
        policy = self.policy
        while True:
            await trio.sleep_until(policy.due_at)
            flows = self._read_flows(tx)
            before_take = self._flows.last_take_s
            period, self._flows = flows - self._flows, flows
            policy.observe(
                fill=tx.fill,
                sent_events=period.sent_events,
                consumed_events=period.consumed_events,
                consumed_batches=period.consumed_batches,
                completed_events=period.completed_events,
                completed_span_s=period.last_take_s if before_take > 0 else 0.0,
                lost_upstream=period.lost_upstream,
                full_waits=period.full_waits,
            )
            change = policy.tick(trio.current_time())
            if change is not None:
                self._changed(change)
            self._sync_gates()

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

    def _sync_gates(self) -> None:
        """Push the policy's gate rate if it moved (N, or the fraction of it the kernel takes)."""
        rate = self.policy.gate_rate
        if rate != self._gate_rate:
            self._gate_rate = rate
            self._push(rate)

    def _push(self, rate: int) -> None:
        for gate in self.gates:
            self._push_to(gate, rate)

    def _push_to(self, gate: SamplingGate, rate: int) -> None:
        try:
            gate.set_sample_rate(rate)
        except Exception as exc:
            # User space still covers the difference: the weights say what the kernel did.
            self.ctx.error(exc, "set_sample_rate()")
