"""When a blocked ring-buffer reader drains, and how much: the ``drain_oldest`` policy.

Theory of operation
-------------------
A reader whose downstream cannot accept has two ways to lose events. It can wait:
the ring fills, the kernel fails reservations, and the *newest* events are lost
while the ring holds stale ones. Or it can skip the oldest records unread
("drain"), so the kernel keeps writing and what is delivered stays current. The
``drain_oldest`` overflow policy does the latter, only while downstream is
blocked, and only as much as needed. :class:`DrainPolicy` decides; the reader
(the shell) looks at the ring, skips the records and logs.

Rules, looked at every ``drain_check_s`` while a send is blocked:

* **memory pressure** (set by the resource enforcer): drain everything
  committed — the target is an empty ring, whatever the watermarks;
* **ring full**: usage at or above ``high_watermark`` — drain down to
  ``low_watermark`` (hysteresis: the next drain waits for the ring to fill again);
* otherwise nothing.

Invariants (``tests/unit/test_drain_policy.py``):

* without memory pressure, nothing is drained below ``high_watermark``, and never
  below ``low_watermark`` (to the byte: ``min_bytes`` rounds down);
* ``0 < min_bytes <= usage * ring_size_bytes``: never more than the ring holds.

``min_bytes`` is a floor: the ring skips whole records, so it may skip a few bytes
more. Pure: no trio, no kernel; the reading comes in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Drain", "DrainPolicy", "DrainReason"]

DrainReason = Literal["memory pressure", "ring full"]
"""Why records were drained; the ``reason`` of their ``DRAINED`` ledger entries."""


@dataclass(frozen=True, slots=True)
class Drain:
    """Skip at least ``min_bytes`` of the oldest committed records, for ``reason``."""

    min_bytes: int
    reason: DrainReason


@dataclass(frozen=True, slots=True)
class DrainPolicy:
    """Ring usage (a fraction of the ring) at which draining starts, and down to which it drains."""

    high_watermark: float = 0.9
    low_watermark: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_watermark < self.high_watermark <= 1.0:
            raise ValueError(
                f"drain watermarks must satisfy 0 <= low ({self.low_watermark}) < "
                f"high ({self.high_watermark}) <= 1"
            )

    def decide(self, usage: float, ring_size_bytes: int, *, memory_pressure: bool) -> Drain | None:
        """What to drain now from a ring ``usage`` full (0..1) of ``ring_size_bytes``,
        downstream being blocked; None for nothing."""
        target: float
        reason: DrainReason
        if memory_pressure:
            target, reason = 0.0, "memory pressure"
        elif usage >= self.high_watermark:
            target, reason = self.low_watermark, "ring full"
        else:
            return None
        excess = int((usage - target) * ring_size_bytes)
        if excess <= 0:
            return None
        return Drain(excess, reason)
