"""Exact event accounting: every event ends in exactly one :class:`Outcome`.

Theory of operation
-------------------
A *producer* (the kernel, or a synthetic source) reports how many events it
produced. Every such event then ends in exactly one outcome, recorded with the
stage that decided it and a reason. Nothing else is counted:

    produced == sum(count for every (outcome, stage, reason))   (at quiescence)

Between quiescent points the difference is the number of events still in
flight (in the ring buffer, in channels, or in a stage's hands); it is never
negative. Each counter also carries the sum of the events' weights, so weighted
totals estimate the true counts when events were sampled (an event kept at rate
1/N weighs N).

This module is pure: no trio, no kernel, no clock. The runtime calls it.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

__all__ = ["Ledger", "LedgerSnapshot", "Outcome", "OutcomeKey", "Tally"]


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    """Written by a sink (exporter)."""
    KERNEL_SAMPLED_OUT = "kernel_sampled_out"
    """Skipped by the in-kernel sampling gate; never left the kernel."""
    USER_SAMPLED_OUT = "user_sampled_out"
    """Discarded by the user-space sampler."""
    DRAINED = "drained"
    """Skipped in the ring buffer without decoding, to let the kernel write fresh events."""
    LOST_ON_RESERVE = "lost_on_reserve"
    """The BPF program could not reserve ring-buffer space (ring full)."""
    STAGE_DROPPED = "stage_dropped"
    """Dropped by a stage, with the stage's name and a reason."""
    FALLBACK = "fallback"
    """Handed to a circuit breaker's fallback (e.g. the spool file)."""
    HEARTBEAT = "heartbeat"
    """An agent-made probe (``pipeline.HEARTBEAT_EVENT``): produced at the source like any
    event, carried through every stage, and consumed right before the sink by the health
    monitor, which records it here. Never delivered."""


@dataclass(frozen=True, slots=True, order=True)
class OutcomeKey:
    outcome: Outcome
    stage: str = ""
    reason: str = ""


@dataclass(slots=True)
class Tally:
    count: int = 0
    weight: float = 0.0

    def add(self, count: int, weight: float) -> None:
        self.count += count
        self.weight += weight


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    produced: int
    produced_weight: float
    outcomes: Mapping[OutcomeKey, Tally]

    @property
    def accounted(self) -> int:
        return sum(t.count for t in self.outcomes.values())

    @property
    def pending(self) -> int:
        """Produced but not yet in an outcome: in flight right now."""
        return self.produced - self.accounted

    def total(self, outcome: Outcome) -> int:
        return sum(t.count for k, t in self.outcomes.items() if k.outcome is outcome)

    def total_weight(self, *outcomes: Outcome, stages: Collection[str] | None = None) -> float:
        """Summed weight of these outcomes, recorded by any stage or only by ``stages``."""
        return sum(
            t.weight
            for k, t in self.outcomes.items()
            if k.outcome in outcomes and (stages is None or k.stage in stages)
        )

    def estimated_true_count(self) -> float:
        """Sampling-weighted estimate of how many events really happened.

        A kept event's weight stands for itself and the events sampled out beside it,
        so sampled-out outcomes are left out (they would count twice); every other
        outcome is an exact count of real events, weighted by the rate in effect."""
        sampled = (Outcome.KERNEL_SAMPLED_OUT, Outcome.USER_SAMPLED_OUT)
        return sum(t.weight for k, t in self.outcomes.items() if k.outcome not in sampled)

    def by_outcome(self) -> dict[str, int]:
        result = {o.value: 0 for o in Outcome}
        for key, tally in self.outcomes.items():
            result[key.outcome.value] += tally.count
        return result

    def as_dict(self) -> dict[str, object]:
        return {
            "produced": self.produced,
            "pending": self.pending,
            "outcomes": self.by_outcome(),
            "detail": [
                {
                    "outcome": k.outcome.value,
                    "stage": k.stage,
                    "reason": k.reason,
                    "count": t.count,
                    "weight": t.weight,
                }
                for k, t in sorted(self.outcomes.items())
            ],
        }


@dataclass(slots=True)
class Ledger:
    """Counts produced events and their outcomes; checks conservation."""

    produced: int = 0
    produced_weight: float = 0.0
    _outcomes: dict[OutcomeKey, Tally] = field(default_factory=dict)
    _tallies: dict[tuple[Outcome, str, str], Tally] = field(default_factory=dict, repr=False, compare=False)
    """The same tallies by plain tuple: a lookup per batch without building an OutcomeKey."""

    def record_produced(self, count: int, weight: float | None = None) -> None:
        if count < 0:
            raise ValueError(f"produced count must be >= 0, got {count}")
        self.produced += count
        self.produced_weight += float(count) if weight is None else weight

    def record(
        self,
        outcome: Outcome,
        count: int,
        weight: float | None = None,
        *,
        stage: str = "",
        reason: str = "",
    ) -> None:
        if count < 0:
            raise ValueError(f"outcome count must be >= 0, got {count}")
        if count == 0 and not weight:
            return
        tally = self._tallies.get((outcome, stage, reason))
        if tally is None:
            tally = self._outcomes[OutcomeKey(outcome, stage, reason)] = Tally()
            self._tallies[outcome, stage, reason] = tally
        tally.add(count, float(count) if weight is None else weight)

    @property
    def accounted(self) -> int:
        return sum(t.count for t in self._outcomes.values())

    @property
    def pending(self) -> int:
        return self.produced - self.accounted

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(
            produced=self.produced,
            produced_weight=self.produced_weight,
            outcomes={k: Tally(t.count, t.weight) for k, t in self._outcomes.items()},
        )

    def check_conserved(self) -> None:
        """Raise AssertionError unless produced == sum of outcomes (call when quiescent)."""
        if self.pending != 0:
            raise AssertionError(
                f"accounting does not balance: produced {self.produced}, "
                f"accounted {self.accounted} (pending {self.pending})"
            )
