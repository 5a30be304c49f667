"""The circuit breaker's table-driven state machine against a tiny if/else model.

Every rule drives both; invariants compare them and check the properties the
breaker promises: open never routes to the primary before the timeout, one
trial per half-open period, every state change counted and reported once.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipeline.breaker import (
    ROUTES,
    TRANSITIONS,
    BreakerEvent,
    BreakerState,
    CircuitBreaker,
    Route,
    Transition,
)


class Model:
    """What the issue says, written the obvious way (strings, no table)."""

    def __init__(self, threshold: int, timeout_s: float) -> None:
        self.threshold = threshold
        self.timeout_s = timeout_s
        self.state = "closed"
        self.streak = 0
        self.opened_at = 0.0
        self.changes = 0

    def _go(self, state: str, now: float) -> None:
        if state == "open":
            self.opened_at = now
        if state == "closed":
            self.streak = 0
        self.state = state
        self.changes += 1

    def allow(self, now: float) -> str:
        if self.state == "open" and now >= self.opened_at + self.timeout_s:
            self._go("half_open", now)
            return "trial"
        return "primary" if self.state == "closed" else "fallback"

    def success(self, now: float) -> None:
        if self.state == "closed":
            self.streak = 0
        elif self.state == "half_open":
            self._go("closed", now)

    def failure(self, now: float) -> None:
        if self.state == "closed":
            self.streak += 1
            if self.streak >= self.threshold:
                self._go("open", now)
        elif self.state == "half_open":
            self._go("open", now)


class BreakerMachine(RuleBasedStateMachine):
    @initialize(
        threshold=st.integers(min_value=1, max_value=6),
        timeout_s=st.sampled_from([0.0, 0.5, 1.0, 30.0]) | st.floats(min_value=0, max_value=100),
        start=st.floats(min_value=0, max_value=1e6),
    )
    def setup(self, threshold: int, timeout_s: float, start: float) -> None:
        self.reported: list[Transition] = []
        self.breaker = CircuitBreaker(
            failure_threshold=threshold, reset_timeout_s=timeout_s, on_transition=self.reported.append
        )
        self.model = Model(threshold, timeout_s)
        self.now = start
        self.outstanding = 0  # batches routed PRIMARY/TRIAL whose outcome is not yet reported
        self.trials_this_half_open = 0

    # -- the clock ---------------------------------------------------------------------
    @rule(dt=st.floats(min_value=0, max_value=50))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.breaker.retry_at is not None)
    @rule()
    def advance_exactly_to_retry(self) -> None:
        assert self.breaker.retry_at is not None
        self.now = max(self.now, self.breaker.retry_at)

    @precondition(lambda self: self.breaker.retry_at is not None)
    @rule()
    def advance_to_just_before_retry(self) -> None:
        retry_at = self.breaker.retry_at
        assert retry_at is not None
        self.now = max(self.now, retry_at - 1e-6)

    # -- routing and outcomes ------------------------------------------------------------
    @rule()
    def ask(self) -> None:
        was_open_early = self.model.state == "open" and self.now < self.model.opened_at + self.model.timeout_s
        route = self.breaker.allow(self.now)
        assert route.value == self.model.allow(self.now)
        if was_open_early:
            assert route is Route.FALLBACK, "open must not route to the primary before the timeout"
        if route is Route.TRIAL:
            self.trials_this_half_open += 1
        elif self.breaker.state is BreakerState.HALF_OPEN:
            assert route is Route.FALLBACK, "only one trial per half-open period"
        if route is not Route.FALLBACK:
            self.outstanding += 1

    @precondition(lambda self: self.outstanding > 0)
    @rule()
    def succeed(self) -> None:
        self.outstanding -= 1
        self.breaker.on_success(self.now)
        self.model.success(self.now)

    @precondition(lambda self: self.outstanding > 0)
    @rule()
    def fail(self) -> None:
        self.outstanding -= 1
        self.breaker.on_failure(self.now)
        self.model.failure(self.now)

    @precondition(lambda self: self.breaker.state is BreakerState.OPEN)
    @rule(ok=st.booleans())
    def stale_outcome_while_open(self, ok: bool) -> None:
        before = self.breaker.statistics()
        (self.breaker.on_success if ok else self.breaker.on_failure)(self.now)
        after = self.breaker.statistics()
        assert after.state is BreakerState.OPEN
        assert after.opened_at == before.opened_at, "a stale outcome must not restart the timer"

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def state_matches_model(self) -> None:
        assert self.breaker.state.value == self.model.state
        if self.model.state == "closed":
            assert self.breaker.failure_streak == self.model.streak
        if self.model.state == "open":
            assert self.breaker.retry_at == self.model.opened_at + self.model.timeout_s

    @invariant()
    def transitions_counted_and_reported_once(self) -> None:
        assert self.breaker.transitions == self.model.changes == len(self.reported)
        assert list(self.breaker.history) == self.reported[-len(self.breaker.history) :]
        for earlier, later in zip(self.reported, self.reported[1:], strict=False):
            assert earlier.new is later.old
            assert earlier.at <= later.at
        for t in self.reported:
            assert t.old is not t.new
            assert TRANSITIONS[t.old, t.event] is t.new

    @invariant()
    def one_trial_per_half_open(self) -> None:
        if self.breaker.state is BreakerState.HALF_OPEN:
            assert self.trials_this_half_open == 1
        else:
            self.trials_this_half_open = 0
        assert self.breaker.trials == sum(t.new is BreakerState.HALF_OPEN for t in self.reported)

    @invariant()
    def opened_counts_entries_into_open(self) -> None:
        assert self.breaker.opened == sum(t.new is BreakerState.OPEN for t in self.reported)


TestBreakerModel = BreakerMachine.TestCase


def test_every_state_has_a_route_and_every_target_is_a_state() -> None:
    assert set(ROUTES) == set(BreakerState)
    assert set(TRANSITIONS.values()) <= set(BreakerState)
    # Both outcomes are defined in every state (OPEN ignores them).
    for state in BreakerState:
        assert (state, BreakerEvent.SUCCESS) in TRANSITIONS
        assert (state, BreakerEvent.FAILURE) in TRANSITIONS


def test_defaults_match_the_issue() -> None:
    breaker = CircuitBreaker()
    for i in range(4):
        breaker.on_failure(float(i))
    assert breaker.state is BreakerState.CLOSED
    breaker.on_failure(4.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow(33.9) is Route.FALLBACK
    assert breaker.allow(34.0) is Route.TRIAL
    assert breaker.allow(34.0) is Route.FALLBACK
    breaker.on_success(34.5)
    assert breaker.state is BreakerState.CLOSED
    assert [(t.old, t.new) for t in breaker.history] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_a_success_ends_the_streak() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    for _ in range(10):
        breaker.on_failure(0.0)
        breaker.on_failure(0.0)
        breaker.on_success(0.0)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.transitions == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"failure_threshold": 0}, "failure_threshold"), ({"reset_timeout_s": -1.0}, "reset_timeout_s")],
)
def test_rejects_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
