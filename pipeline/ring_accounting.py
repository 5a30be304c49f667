"""Ring-buffer accounting: kernel counters and ring reads in, ledger increments out.

The pure core behind :class:`stages.reader.RingBufferReader`'s accounting (see
:mod:`pipeline.accounting` for the ledger it feeds). No trio, no kernel: the
reader reads the counters and the ring and passes the numbers in.

Theory of operation
-------------------
The kernel counts, per CPU, every event a program produced and its fate::

    events == sampled_out + lost_reserve + emitted      (once no program is mid-run)

The reader reports ``produced`` from the ``events`` counter, and gives
sampled-out and lost-reserve events their outcome (unadmitted: they never
reached user space). Every emitted record is then taken from the ring — read and
sent on, or skipped and recorded as ``DRAINED``. :class:`RingAccountant` does
the arithmetic:

* Counters are read *after* consuming the ring. Programs count ``emitted``
  *before* submitting a record, so the counters never lag what was read.
* Counters are read every so often, not per batch (a read is a syscall per
  counter). Records taken since the last read are credited as produced before
  they are sent (``produced = max(events, consumed + sampled_out +
  lost_reserve)`` over the last counters), so ``produced`` never lags what was
  sent, never exceeds the true count, and the next read absorbs the credit.
* At shutdown the program is stopped first, so nothing new arrives; the rest of
  the ring is taken, and the final counters are observed once every in-flight
  program run has finished. What still never became readable by the deadline is
  :meth:`RingAccountant.abandon`-ed (the reader records it as ``DRAINED``).

Invariants, given counters that follow the kernel's rules (checked against a kernel
model in ``tests/unit/test_reader_accounting.py``):

* ``produced`` only grows, and never exceeds the kernel's true ``events``;
* ``unresolved = produced - sampled_out - lost_reserve - consumed - abandoned >= 0``;
* once the ring is empty and no program is mid-run, observing the final counters
  makes ``produced == events`` and ``unresolved == 0``: the source's ledger then
  balances exactly::

      produced == sent + kernel_sampled_out + lost_on_reserve + drained
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KernelCounters", "LedgerStep", "RingAccountant"]


@dataclass(frozen=True, slots=True)
class KernelCounters:
    """Cumulative kernel-side counters (sums over CPUs) of one program."""

    events: int = 0
    sampled_out: int = 0
    lost_reserve: int = 0
    emitted: int = 0

    @classmethod
    def from_stats(cls, stats: Mapping[str, int]) -> KernelCounters:
        missing = [k for k in ("events", "sampled_out", "lost_reserve", "emitted") if k not in stats]
        if missing:
            raise ValueError(f"kernel_stats() lacks {', '.join(missing)} (got {sorted(stats)})")
        return cls(
            int(stats["events"]),
            int(stats["sampled_out"]),
            int(stats["lost_reserve"]),
            int(stats["emitted"]),
        )

    @property
    def in_flight(self) -> int:
        """Events counted but not yet given a kernel-side fate (a program mid-run)."""
        return self.events - self.sampled_out - self.lost_reserve - self.emitted


@dataclass(frozen=True, slots=True)
class LedgerStep:
    """Increments for the ledger: produced events, and unadmitted outcomes."""

    produced: int = 0
    sampled_out: int = 0
    lost_reserve: int = 0


class RingAccountant:
    """Turns cumulative kernel counters and the records taken from the ring into
    ledger increments. See the module docstring."""

    def __init__(self) -> None:
        self.kernel = KernelCounters()
        self.consumed = 0
        """Records taken from the ring (read or skipped)."""
        self.produced = 0
        self.sampled_out = 0
        self.lost_reserve = 0
        self.abandoned = 0
        """Produced events given up on at shutdown (never became readable)."""

    def took(self, records: int) -> int:
        """``records`` more were taken from the ring; returns the produced increment to
        report before sending them."""
        if records < 0:
            raise ValueError(f"records must be >= 0, got {records}")
        self.consumed += records
        return self._advance()

    def observe(self, counters: KernelCounters) -> LedgerStep:
        """New cumulative counters (read after consuming the ring)."""
        old = self.kernel
        if (
            counters.events < old.events
            or counters.sampled_out < old.sampled_out
            or counters.lost_reserve < old.lost_reserve
            or counters.emitted < old.emitted
        ):
            raise ValueError(f"kernel counters went backwards: {old} -> {counters}")
        self.kernel = counters
        produced = self._advance()
        sampled = counters.sampled_out - self.sampled_out
        lost = counters.lost_reserve - self.lost_reserve
        self.sampled_out = counters.sampled_out
        self.lost_reserve = counters.lost_reserve
        return LedgerStep(produced, sampled, lost)

    def _advance(self) -> int:
        # Events the counters show, or - if more records were taken since - those records
        # plus the events the counters gave a kernel-side fate: never more than the true
        # count (each term is), never less than what has an outcome or was sent.
        kernel = self.kernel
        target = max(kernel.events, self.consumed + kernel.sampled_out + kernel.lost_reserve)
        if target <= self.produced:
            return 0
        delta = target - self.produced
        self.produced = target
        return delta

    @property
    def unresolved(self) -> int:
        """Produced events this source has not yet given an outcome or sent on: in
        the ring, or counted by a program that has not finished with them."""
        return self.produced - self.sampled_out - self.lost_reserve - self.consumed - self.abandoned

    @property
    def readable_backlog(self) -> int:
        """Records the kernel says it emitted that have not been taken from the ring."""
        return self.kernel.emitted - self.consumed

    def abandon(self) -> int:
        """Give up on every unresolved event (shutdown deadline); returns how many."""
        residual = max(0, self.unresolved)
        self.abandoned += residual
        return residual
