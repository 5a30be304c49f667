"""The circuit breaker's state machine: pure, clock passed in, no trio.

Rules
=====

1. Everything that decides the breaker's state lives in this file, and as much of
   it as possible in the two tables below (``TRANSITIONS`` and ``ROUTES``). The
   few rules that do not fit a table are written out next to the code that applies
   them, in :class:`CircuitBreaker`.
2. This file knows nothing about stages, batches or I/O. The caller (the
   ``CircuitBreakerStage`` shell) asks :meth:`CircuitBreaker.allow` where a batch
   should go, runs it, and reports :meth:`~CircuitBreaker.on_success` or
   :meth:`~CircuitBreaker.on_failure`. Time is a float of seconds from any
   monotonic clock, given to every call; it must never go backwards.

Theory of operation
===================

Three states, ``CLOSED`` (the initial state), ``OPEN`` and ``HALF_OPEN``:

* ``CLOSED``: every batch goes to the primary. Each failure lengthens the
  *failure streak*, each success ends it. When the streak reaches
  ``failure_threshold`` the failure is a ``TRIP`` instead: the breaker opens.
* ``OPEN``: every batch goes to the fallback, until ``reset_timeout_s`` has passed
  since the breaker opened. The first :meth:`allow` at or after that moment fires
  ``COOLDOWN_ELAPSED``: the breaker becomes ``HALF_OPEN`` and *that call* returns
  :attr:`Route.TRIAL` — the one trial batch.
* ``HALF_OPEN``: the trial is in flight; any other batch goes to the fallback (so
  there is exactly one trial per half-open period). The trial's outcome decides:
  success closes the breaker, failure opens it again and restarts the timer.

The caller reports the outcome of every batch routed ``PRIMARY`` or ``TRIAL``. The
stage shell does so before it asks about the next batch. A caller that overlaps
batches should know that an outcome reported while ``HALF_OPEN`` is taken to be
the trial's, and one reported while ``OPEN`` is stale and ignored (the table's
self-loops). Half-open is entered lazily, when a batch arrives after the
cooldown; with no traffic a breaker stays ``OPEN``.

Every change of state is a :class:`Transition`, counted, kept in a short history
and handed to the ``on_transition`` callback (the shell logs it there).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "ROUTES",
    "TRANSITIONS",
    "BreakerEvent",
    "BreakerState",
    "BreakerStatistics",
    "CircuitBreaker",
    "Route",
    "Transition",
]


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(enum.StrEnum):
    SUCCESS = "success"
    """A batch routed to the primary (or the trial) succeeded."""
    FAILURE = "failure"
    """A batch failed and, while closed, the failure streak is still short of the threshold."""
    TRIP = "trip"
    """A failure that brought the streak to ``failure_threshold``."""
    COOLDOWN_ELAPSED = "cooldown_elapsed"
    """A batch arrived at least ``reset_timeout_s`` after the breaker opened."""


class Route(enum.StrEnum):
    PRIMARY = "primary"
    FALLBACK = "fallback"
    TRIAL = "trial"
    """Send this batch to the primary as the half-open trial; report its outcome."""


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

TRANSITIONS: Mapping[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (CLOSED, BreakerEvent.SUCCESS): CLOSED,  # ends the failure streak
    (CLOSED, BreakerEvent.FAILURE): CLOSED,  # lengthens it
    (CLOSED, BreakerEvent.TRIP): OPEN,
    (OPEN, BreakerEvent.SUCCESS): OPEN,  # stale outcome: ignored
    (OPEN, BreakerEvent.FAILURE): OPEN,  # stale outcome: ignored
    (OPEN, BreakerEvent.COOLDOWN_ELAPSED): HALF_OPEN,  # this batch is the trial
    (HALF_OPEN, BreakerEvent.SUCCESS): CLOSED,  # the trial succeeded
    (HALF_OPEN, BreakerEvent.FAILURE): OPEN,  # the trial failed; the timer restarts
}
"""(state, event) -> next state. A pair missing here is a bug in the caller."""

ROUTES: Mapping[BreakerState, Route] = {
    CLOSED: Route.PRIMARY,
    OPEN: Route.FALLBACK,
    HALF_OPEN: Route.FALLBACK,  # the trial is already in flight
}
"""Where :meth:`CircuitBreaker.allow` sends a batch in each state, except that the
call which fires ``COOLDOWN_ELAPSED`` returns :attr:`Route.TRIAL`."""


@dataclass(frozen=True, slots=True)
class Transition:
    at: float
    old: BreakerState
    new: BreakerState
    event: BreakerEvent


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    state: BreakerState
    failure_streak: int
    transitions: int
    """State changes so far (self-loops are not counted)."""
    opened: int
    """Times the breaker entered OPEN (trips and failed trials)."""
    trials: int
    successes: int
    failures: int
    opened_at: float | None
    """When the breaker last opened (None if it never has)."""


class CircuitBreaker:
    """A closed/open/half-open breaker. See the module docstring for the rules.

    ``failure_threshold`` consecutive failures open it (default 5); it stays open
    ``reset_timeout_s`` seconds (default 30) before one trial batch may test the
    primary. ``on_transition`` is called with every :class:`Transition`.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        on_transition: Callable[[Transition], None] | None = None,
        history: int = 64,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if reset_timeout_s < 0:
            raise ValueError(f"reset_timeout_s must be >= 0, got {reset_timeout_s}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.on_transition = on_transition
        self.state = CLOSED
        self.failure_streak = 0
        self.opened_at: float | None = None
        self.history: deque[Transition] = deque(maxlen=history)
        """The most recent transitions, oldest first."""
        self.transitions = 0
        self.opened = 0
        self.trials = 0
        self.successes = 0
        self.failures = 0

    @property
    def retry_at(self) -> float | None:
        """When OPEN: the earliest time a batch becomes the trial. Otherwise None."""
        if self.state is not OPEN or self.opened_at is None:
            return None
        return self.opened_at + self.reset_timeout_s

    def allow(self, now: float) -> Route:
        """Where the next batch goes. A ``TRIAL`` or ``PRIMARY`` answer obliges the
        caller to report the batch's outcome."""
        retry_at = self.retry_at
        if retry_at is not None and now >= retry_at:
            self._fire(BreakerEvent.COOLDOWN_ELAPSED, now)
            self.trials += 1
            return Route.TRIAL
        return ROUTES[self.state]

    def on_success(self, now: float) -> None:
        self.successes += 1
        self._fire(BreakerEvent.SUCCESS, now)

    def on_failure(self, now: float) -> None:
        self.failures += 1
        event = BreakerEvent.FAILURE
        if self.state is CLOSED:
            # The one counting rule outside the table: the streak decides FAILURE vs TRIP.
            self.failure_streak += 1
            if self.failure_streak >= self.failure_threshold:
                event = BreakerEvent.TRIP
        self._fire(event, now)

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(
            state=self.state,
            failure_streak=self.failure_streak,
            transitions=self.transitions,
            opened=self.opened,
            trials=self.trials,
            successes=self.successes,
            failures=self.failures,
            opened_at=self.opened_at,
        )

    def _fire(self, event: BreakerEvent, now: float) -> None:
        old = self.state
        try:
            new = TRANSITIONS[old, event]
        except KeyError:
            raise RuntimeError(f"circuit breaker cannot handle {event} in state {old}") from None
        if event is BreakerEvent.SUCCESS and old is CLOSED:
            self.failure_streak = 0
        if new is old:
            return
        # Entering a state has one effect each: OPEN starts the timer, CLOSED forgets the streak.
        if new is OPEN:
            self.opened_at = now
            self.opened += 1
        elif new is CLOSED:
            self.failure_streak = 0
        self.state = new
        self.transitions += 1
        transition = Transition(now, old, new, event)
        self.history.append(transition)
        if self.on_transition is not None:
            self.on_transition(transition)
