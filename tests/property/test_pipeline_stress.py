"""Flow control under stress: the whole pipeline, random load, random failures, random limits.

A :class:`~stages.synthetic.SyntheticSource` at a random rate (with random bursts)
feeds a random chain — slow stages, stages that raise at random batches, a
full-control stage that crashes, a filter, a circuit breaker around a failing
primary with a small spool as its fallback, an adaptive sampler — into a sink that
may itself be slow or fail (alone, or behind its own breaker and spool). Channel
capacities and the in-flight limits are random too. Each example runs on trio's
autojump clock until the source ends, or for a random time and then ``stop()``,
``abort()``, or ``stop()`` and a little later ``abort()``.

Invariants, checked while it runs (a watcher task every few virtual milliseconds,
and the sink at every batch) and at the end:

* conservation: ``pending`` is never negative; it lies between the budget's
  in-flight events and those plus what the source holds; at the end it is 0, the
  budget is empty and no stage holds an event;
* no channel ever holds more batches than its capacity;
* in-flight events (bytes) never exceed ``max_inflight_events`` (``_bytes``), except
  for the documented single oversized batch admitted when nothing else is in flight,
  and the budget's byte count stays exact;
* every delivered event arrives once, in source order (``seq`` strictly increasing);
  with nothing that loses events, all of them arrive;
* every outcome has a reason this chain can give (``shutdown`` only after an abort);
  the spools hold exactly the ``FALLBACK`` events, within their caps;
* without sampling, the weighted estimate equals the true count exactly;
* nothing raises out of ``Pipeline.run``, and the only stage errors are the injected ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import event, example, given
from hypothesis import strategies as st

from pipeline import (
    Batch,
    BatchReceiver,
    BatchSender,
    BatchSink,
    BatchStage,
    Config,
    NodeSpec,
    Outcome,
    Pipeline,
    Stage,
    StageContext,
)
from pipeline.config import LimitsConfig
from stages.breaker import CircuitBreakerConfig, CircuitBreakerSink, CircuitBreakerStage
from stages.noop import NoopStage
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig
from stages.spool_sink import SpoolConfig, SpoolSink
from stages.synthetic import SYNTHETIC_DTYPE, SyntheticConfig, SyntheticSource

BYTES_PER_EVENT = SYNTHETIC_DTYPE.itemsize + 8  # the event plus its float64 weight
SETTINGS = Config(limits=LimitsConfig(max_memory_mb=0))
"""The in-flight limits come from each scenario (see ``scenario_settings``)."""
WATCH_EVERY_S = 0.004
MAX_BATCHES = 300
"""Keeps each example well under a second of real time."""


class InjectedFailure(Exception):
    """The only error a stage may report in these tests."""


# -- the stages under test ----------------------------------------------------------------


class FailAtConfig(msgspec.Struct, frozen=True):
    fail_at: frozenset[int] = frozenset()
    """The ``process()``/``write()`` calls (0-based) that raise."""


class FailingStage(BatchStage):
    """Raises at the configured batches, passes the others on."""

    Config = FailAtConfig
    config: FailAtConfig

    def __init__(self, config: FailAtConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.calls = 0

    def process(self, batch: Batch) -> Batch:
        call, self.calls = self.calls, self.calls + 1
        if call in self.config.fail_at:
            raise InjectedFailure(f"batch {call}")
        return batch


class DropOddSeq(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch.select(batch.events["seq"] % 2 == 0)


class DelayConfig(msgspec.Struct, frozen=True):
    delay_s: float = 0.0


class SlowStage(Stage):
    """Takes ``delay_s`` of (virtual) time per batch."""

    Config = DelayConfig
    config: DelayConfig

    async def run(
        self, rx: BatchReceiver, tx: BatchSender, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        async for batch in rx:
            await trio.sleep(self.config.delay_s)
            await tx.send(batch)


class CrashAfterConfig(msgspec.Struct, frozen=True):
    batches: int = 0


class CrashingStage(Stage):
    """A full-control stage that dies (holding a batch) after passing some on."""

    Config = CrashAfterConfig
    config: CrashAfterConfig

    async def run(
        self, rx: BatchReceiver, tx: BatchSender, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        passed = 0
        async for batch in rx:
            if passed == self.config.batches:
                raise InjectedFailure(f"crashed after {passed} batches")
            await tx.send(batch)
            passed += 1


@dataclass(frozen=True)
class SinkConfig:
    delay_s: float = 0.0
    fail_at: frozenset[int] = frozenset()
    probe: Any = None
    """Called at every batch: checks the live invariants there too."""


class RecordingSink(BatchSink):
    """Keeps the ``seq`` of every event it writes; may be slow or fail."""

    Config = SinkConfig
    config: SinkConfig

    def __init__(self, config: SinkConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.seqs: list[np.ndarray] = []
        self.calls = 0

    async def write(self, batch: Batch) -> None:
        if self.config.probe is not None:
            self.config.probe()
        call, self.calls = self.calls, self.calls + 1
        if self.config.delay_s:
            await trio.sleep(self.config.delay_s)
        if call in self.config.fail_at:
            raise InjectedFailure(f"write {call}")
        self.seqs.append(batch.events["seq"].copy())


# -- scenarios ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    kind: str
    delay_s: float = 0.0
    fail_at: frozenset[int] = frozenset()
    crash_after: int = 0
    failure_threshold: int = 1
    reset_timeout_s: float = 0.0
    spool_max_bytes: int = 1
    max_sample_rate: int = 1
    max_events_per_sec: float = 0.0
    seed: int = 0

    @property
    def loses_events(self) -> bool:
        return self.kind in ("sampler", "filter", "crash") or bool(self.fail_at)


@dataclass(frozen=True)
class Scenario:
    source: SyntheticConfig
    stages: tuple[StageSpec, ...]
    sink: StageSpec
    capacities: tuple[int, ...]
    max_inflight_events: int
    max_inflight_bytes: int
    ending: str
    """``end`` (the source runs out), ``stop`` or ``abort`` after ``run_for_s``, or
    ``stop+abort``: stop, then abort ``abort_after_s`` later (an impatient operator)."""
    run_for_s: float
    abort_after_s: float = 0.0

    @property
    def loses_events(self) -> bool:
        return "abort" in self.ending or any(s.loses_events for s in (*self.stages, self.sink))


STAGE_KINDS = ("noop", "slow", "slow", "fail", "crash", "filter", "breaker", "breaker", "sampler", "sampler")
"""Weighted: the kinds that make pressure and failures come up more often."""

failures = st.one_of(
    st.frozensets(st.integers(0, 30), max_size=8),  # scattered failures, or an outage:
    st.builds(lambda first, n: frozenset(range(first, first + n)), st.integers(0, 10), st.integers(1, 30)),
)


@st.composite
def stage_specs(draw: st.DrawFn, kind: str) -> StageSpec:
    if kind == "slow":
        return StageSpec(kind, delay_s=draw(st.floats(0.0, 0.02)))
    if kind == "fail":
        return StageSpec(kind, fail_at=draw(failures))
    if kind == "crash":
        return StageSpec(kind, crash_after=draw(st.integers(0, 20)))
    if kind == "breaker":
        return StageSpec(
            kind,
            fail_at=draw(failures),
            failure_threshold=draw(st.integers(1, 3)),
            reset_timeout_s=draw(st.sampled_from([0.0, 0.005, 0.05, 1.0])),
            spool_max_bytes=draw(st.integers(1, 3000)),
        )
    if kind == "sampler":
        return StageSpec(
            kind,
            max_sample_rate=draw(st.sampled_from([1, 2, 8, 64])),
            max_events_per_sec=draw(st.sampled_from([0.0, 100.0, 5000.0])),
            seed=draw(st.integers(0, 2**16)),
        )
    return StageSpec(kind)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    batch_size = draw(st.integers(1, 256))
    rate = draw(st.sampled_from([0.0, 50.0, 1000.0, 20_000.0, 200_000.0, 1e6]))
    burst = {}
    if draw(st.booleans()):
        burst = {
            "burst_factor": draw(st.floats(0.1, 10.0)),
            "burst_period_s": draw(st.floats(0.005, 0.5)),
            "burst_duty": draw(st.floats(0.0, 1.0)),
        }
    peak_rate = rate * max(1.0, burst.get("burst_factor", 1.0))
    ending = draw(st.sampled_from(["end", "stop", "abort", "stop+abort"]))
    if rate == 0:  # as fast as downstream allows: only a total ends it
        ending = "end"
    # Bound the work (batches) and the virtual time of every example.
    most_events = MAX_BATCHES * batch_size
    if rate > 0:
        most_events = min(most_events, max(1, int(rate * 2.0)))
    share = draw(st.floats(0.0, 1.0))
    total = max(1, round(share * most_events)) if ending == "end" else draw(st.sampled_from([0, most_events]))
    run_for_s = draw(st.floats(0.0, 1.0))
    if peak_rate > 0:
        run_for_s = min(run_for_s, MAX_BATCHES * batch_size / peak_rate)
    source = SyntheticConfig(
        rate_per_s=rate,
        batch_size=batch_size,
        total_events=total,
        seed=draw(st.integers(0, 2**16)),
        max_tick_s=0.01,
        **burst,
    )

    kinds = draw(
        st.lists(
            st.sampled_from(STAGE_KINDS),
            max_size=4,
        )
    )
    if kinds.count("sampler") > 1:  # one sampler per chain, as configured in practice
        first = kinds.index("sampler")
        kinds = [k for i, k in enumerate(kinds) if k != "sampler" or i == first]
    stages = tuple(draw(stage_specs(k)) for k in kinds)
    sink = StageSpec(
        draw(st.sampled_from(["sink", "sink", "breaker_sink"])),
        delay_s=draw(st.sampled_from([0.0, 0.0005, 0.002, 0.01, 0.02])),
        fail_at=draw(st.one_of(st.just(frozenset()), failures)),
        failure_threshold=draw(st.integers(1, 3)),
        reset_timeout_s=draw(st.sampled_from([0.0, 0.005, 0.05, 1.0])),
        spool_max_bytes=draw(st.integers(1, 3000)),
    )
    capacities = tuple(draw(st.lists(st.integers(1, 8), min_size=len(stages) + 1, max_size=len(stages) + 1)))
    # Limits near a batch's size make the source wait; far below it, only the
    # oversized-batch rule lets anything through.
    near = 4 * batch_size
    unbounded = st.just(0)
    max_events = draw(st.one_of(unbounded, unbounded, st.integers(1, near), st.integers(1, 2000)))
    max_bytes = draw(
        st.one_of(unbounded, unbounded, st.integers(1, near * BYTES_PER_EVENT), st.integers(1, 100_000))
    )
    abort_after_s = draw(st.floats(0.0, 0.1))
    return Scenario(source, stages, sink, capacities, max_events, max_bytes, ending, run_for_s, abort_after_s)


# -- building and checking ---------------------------------------------------------------------


def spool_path(spool_dir: str, name: str) -> str:
    return os.path.join(spool_dir, f"{name}.jsonl")


def spool_config(spool_dir: str, name: str, spec: StageSpec) -> SpoolConfig:
    return SpoolConfig(path=spool_path(spool_dir, name), max_bytes=spec.spool_max_bytes)


def breaker_config(spec: StageSpec) -> CircuitBreakerConfig:
    return CircuitBreakerConfig(
        failure_threshold=spec.failure_threshold, reset_timeout_s=spec.reset_timeout_s, stage_timeout_s=0
    )


def node(index: int, spec: StageSpec, spool_dir: str) -> NodeSpec:
    name = f"{spec.kind}{index}"
    if spec.kind == "noop":
        return NodeSpec(name, NoopStage)
    if spec.kind == "slow":
        return NodeSpec(name, SlowStage, DelayConfig(spec.delay_s))
    if spec.kind == "fail":
        return NodeSpec(name, FailingStage, FailAtConfig(spec.fail_at))
    if spec.kind == "crash":
        return NodeSpec(name, CrashingStage, CrashAfterConfig(spec.crash_after))
    if spec.kind == "filter":
        return NodeSpec(name, DropOddSeq)
    if spec.kind == "breaker":
        guarded = CircuitBreakerStage.around(
            FailingStage,
            FailAtConfig(spec.fail_at),
            fallback=SpoolSink,
            fallback_config=spool_config(spool_dir, name, spec),
        )
        return NodeSpec(name, guarded, breaker_config(spec))
    assert spec.kind == "sampler"
    config = AdaptiveSamplerConfig(
        max_sample_rate=spec.max_sample_rate,
        max_events_per_sec=spec.max_events_per_sec,
        adjust_period_s=0.005,
        high_lag_s=0.0,  # lag is measured on the real clock: keep examples deterministic
        low_lag_s=0.0,
        seed=spec.seed,
    )
    return NodeSpec(name, AdaptiveSampler, config)


def inflight_bounds(scenario: Scenario) -> tuple[float, float]:
    """The most events and bytes the budget may hold: its limits, or one batch larger
    than the whole budget (admitted when nothing else is in flight)."""
    batch = scenario.source.batch_size
    events = max(scenario.max_inflight_events, batch) if scenario.max_inflight_events else math.inf
    nbytes = (
        max(scenario.max_inflight_bytes, batch * BYTES_PER_EVENT) if scenario.max_inflight_bytes else math.inf
    )
    return events, nbytes


def check_live(pipe: Pipeline, scenario: Scenario) -> None:
    """What must hold at every moment of the run."""
    pending = pipe.ledger.pending
    assert pending >= 0, f"more outcomes than events produced (pending {pending})"
    budget = pipe.budget
    source_held = pipe.contexts[0].stats.held_events
    # Everything produced and without an outcome is in flight (admitted) or still in
    # the source's hands (produced, not yet admitted; a batch being sent is both).
    assert budget.events <= pending <= budget.events + source_held, (budget.events, pending, source_held)
    max_events, max_bytes = inflight_bounds(scenario)
    assert 0 <= budget.events <= max_events, (budget.events, scenario.max_inflight_events)
    assert 0 <= budget.bytes <= max_bytes, (budget.bytes, scenario.max_inflight_bytes)
    # Every batch here holds the same bytes per event, so the budget's proportional
    # release must keep its byte count exact.
    assert budget.bytes == BYTES_PER_EVENT * budget.events, (budget.bytes, budget.events)
    for edge in pipe.edges:
        assert 0 <= edge.depth <= edge.capacity, (edge.name, edge.depth, edge.capacity)
        assert edge.queued_events >= 0 and edge.queued_bytes >= 0, edge.statistics()


ALLOWED_REASONS = {
    Outcome.DELIVERED: {""},
    Outcome.USER_SAMPLED_OUT: {"adaptive sampling"},
    Outcome.FALLBACK: {"primary failed", "circuit open"},
    Outcome.STAGE_DROPPED: {"filtered", "error", "stage failed", "spool full", "stopped before send"},
}


def check_end(pipe: Pipeline, scenario: Scenario, sink: RecordingSink, spool_dir: str) -> None:
    stats = pipe.statistics()
    ledger = stats.ledger
    # conservation, exactly
    assert ledger.pending == 0, ledger.as_dict()
    pipe.ledger.check_conserved()
    assert stats.budget.events == 0 and stats.budget.bytes == 0, stats.budget
    for edge in stats.edges:
        assert edge.depth == 0 and edge.queued_events == 0 and edge.queued_bytes == 0, edge
    for stage in stats.stages:
        assert stage.held_events == 0, stage
    # the limits held at their peaks too (the watcher samples; the peaks do not miss)
    max_events, max_bytes = inflight_bounds(scenario)
    assert stats.budget.peak_events <= max_events, stats.budget
    assert stats.budget.peak_bytes <= max_bytes, stats.budget
    for edge in stats.edges:
        assert edge.peak_depth <= edge.capacity, edge

    # every outcome is one this chain can produce, for a reason it can give
    allowed = {o: set(r) for o, r in ALLOWED_REASONS.items()}
    if "abort" in scenario.ending:
        allowed[Outcome.STAGE_DROPPED].add("shutdown")
    for key, tally in ledger.outcomes.items():
        assert key.outcome in allowed and key.reason in allowed[key.outcome], (key, tally)
    if not any(s.kind == "sampler" for s in scenario.stages):
        assert ledger.total(Outcome.USER_SAMPLED_OUT) == 0
    # the only errors are the injected ones
    for stage in stats.stages:
        assert stage.errors == 0 or stage.last_error.startswith("InjectedFailure"), stage

    # delivered: once each, in source order
    seqs = np.concatenate(sink.seqs) if sink.seqs else np.zeros(0, dtype=np.uint64)
    assert len(seqs) == ledger.total(Outcome.DELIVERED)
    assert (np.diff(seqs.astype(np.int64)) > 0).all(), "delivered out of order or twice"
    assert len(seqs) == 0 or int(seqs[-1]) < ledger.produced
    if scenario.source.total_events:
        assert ledger.produced <= scenario.source.total_events
    if scenario.ending == "end":
        assert ledger.produced == scenario.source.total_events
    if not scenario.loses_events and scenario.ending == "end":
        assert seqs.tolist() == list(range(scenario.source.total_events))
    if not scenario.loses_events and scenario.ending == "stop":
        # graceful: everything the source sent arrives; only a batch it was still
        # trying to send when stopped is given up (and says so)
        sent = stats.stage("source").sent_events
        assert seqs.tolist() == list(range(sent))
        assert ledger.produced - sent <= scenario.source.batch_size

    # the spools hold exactly what was recorded as FALLBACK, within their caps
    spooled = 0
    guarded = [(f"breaker{i + 1}", spec) for i, spec in enumerate(scenario.stages) if spec.kind == "breaker"]
    if scenario.sink.kind == "breaker_sink":
        guarded.append(("sink", scenario.sink))
    for name, spec in guarded:
        path = spool_path(spool_dir, name)
        if os.path.exists(path):
            assert os.path.getsize(path) <= spec.spool_max_bytes
            with open(path, "rb") as f:
                spooled += sum(1 for _ in f)
    assert spooled == ledger.total(Outcome.FALLBACK)

    # without sampling every weight is 1, so the estimate is the exact count
    if not any(s.kind == "sampler" for s in scenario.stages):
        assert ledger.estimated_true_count() == ledger.produced


def build(scenario: Scenario, spool_dir: str) -> Pipeline:
    specs = [NodeSpec("source", SyntheticSource, scenario.source)]
    specs += [node(i + 1, spec, spool_dir) for i, spec in enumerate(scenario.stages)]
    probe_target: list[Pipeline] = []

    def probe() -> None:
        check_live(probe_target[0], scenario)

    spec = scenario.sink
    recording = SinkConfig(spec.delay_s, spec.fail_at, probe)
    if spec.kind == "breaker_sink":
        guarded = CircuitBreakerSink.around(
            RecordingSink,
            recording,
            fallback=SpoolSink,
            fallback_config=spool_config(spool_dir, "sink", spec),
        )
        specs.append(NodeSpec("sink", guarded, breaker_config(spec)))
    else:
        specs.append(NodeSpec("sink", RecordingSink, recording))
    limits = msgspec.structs.replace(
        SETTINGS.limits,
        max_inflight_events=scenario.max_inflight_events,
        max_inflight_bytes=scenario.max_inflight_bytes,
    )
    pipe = Pipeline(specs, scenario.capacities, settings=msgspec.structs.replace(SETTINGS, limits=limits))
    probe_target.append(pipe)
    return pipe


async def drive(pipe: Pipeline, scenario: Scenario) -> int:
    """Run the pipeline to its end; returns how many times the watcher looked."""
    looks = 0

    async def watch() -> None:
        nonlocal looks
        while True:
            check_live(pipe, scenario)
            looks += 1
            await trio.sleep(WATCH_EVERY_S)

    # Virtual seconds: far more than any example needs; only a hang trips it.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipe.run)
            nursery.start_soon(watch)
            if scenario.ending != "end":
                with trio.move_on_after(scenario.run_for_s):
                    await pipe.finished.wait()
                if scenario.ending == "abort":
                    pipe.abort()
                else:
                    pipe.stop()
                if scenario.ending == "stop+abort":
                    with trio.move_on_after(scenario.abort_after_s):
                        await pipe.finished.wait()
                    pipe.abort()
            await pipe.finished.wait()
            check_live(pipe, scenario)
            nursery.cancel_scope.cancel()
    return looks


def run_scenario(scenario: Scenario) -> Pipeline:
    with tempfile.TemporaryDirectory(prefix="bpfpipe-stress-") as spool_dir:
        pipe = build(scenario, spool_dir)
        trio.run(drive, pipe, scenario, clock=trio.testing.MockClock(autojump_threshold=0))
        sink = pipe.nodes[-1]
        if isinstance(sink, CircuitBreakerSink):
            sink = sink.guard.primary
        assert isinstance(sink, RecordingSink)
        check_end(pipe, scenario, sink, spool_dir)
    return pipe


def describe(pipe: Pipeline, scenario: Scenario) -> None:
    """Label the example, so ``--hypothesis-show-statistics`` shows what was exercised."""
    stats = pipe.statistics()
    reasons = {k.reason or k.outcome.value for k in stats.ledger.outcomes}
    event(f"ending: {scenario.ending}")
    if stats.budget.waits:
        event("source waited for the in-flight budget")
    if any(e.peak_depth == e.capacity for e in stats.edges):
        event("a channel was full")
    for reason in sorted(reasons - {"delivered"}):
        event(f"outcome reason: {reason}")
    for node in pipe.nodes:
        if isinstance(node, AdaptiveSampler) and node.policy.changes:
            event("sampler changed its rate")
        if isinstance(node, CircuitBreakerStage) and node.breaker.opened:
            event("breaker stage opened")
        if isinstance(node, CircuitBreakerSink) and node.breaker.opened:
            event("breaker sink opened")


SINK = StageSpec("sink")

CRASH_WITH_A_TINY_BUDGET = Scenario(
    source=SyntheticConfig(batch_size=1, total_events=74),
    stages=(StageSpec("crash", crash_after=0),),
    sink=SINK,
    capacities=(1, 1),
    max_inflight_events=0,
    max_inflight_bytes=1,
    ending="end",
    run_for_s=0.0,
)
"""Found by this test: a crashed stage's batch kept its in-flight budget until the
stage's input ended, and the source waited for that budget before it could end it."""

OVERLOAD = Scenario(
    source=SyntheticConfig(rate_per_s=1e6, batch_size=100, burst_factor=3, burst_period_s=0.05, seed=1),
    stages=(
        StageSpec("sampler", max_sample_rate=16, max_events_per_sec=5000.0, seed=1),
        StageSpec(
            "breaker",
            fail_at=frozenset(range(3, 20)),
            failure_threshold=2,
            reset_timeout_s=0.005,
            spool_max_bytes=2000,
        ),
        StageSpec("slow", delay_s=0.002),
    ),
    sink=StageSpec(
        "breaker_sink",
        delay_s=0.01,
        fail_at=frozenset({5, 6, 7}),
        failure_threshold=2,
        reset_timeout_s=0.05,
        spool_max_bytes=500,
    ),
    capacities=(2, 1, 2, 1),
    max_inflight_events=0,
    max_inflight_bytes=0,
    ending="stop",
    run_for_s=0.3,
)
"""Every mechanism at once: full channels, the sampler and its cap, the breaker
opening and recovering, a full spool, a failing sink behind its own breaker."""


@given(scenarios())
@example(CRASH_WITH_A_TINY_BUDGET)
@example(OVERLOAD)
@example(dataclasses.replace(OVERLOAD, ending="abort"))
@example(dataclasses.replace(OVERLOAD, ending="stop+abort", abort_after_s=0.02))
def test_flow_control_invariants_hold_under_random_load(scenario: Scenario) -> None:
    describe(run_scenario(scenario), scenario)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_outcomes_estimate_the_true_count_under_sampling(seed: int) -> None:
    """Sampled-out events are represented by the weights of the kept ones: with the
    sampler shedding most of an overload, the weighted outcomes still estimate the
    true count (within 5 sigma; each kept event's variance is at most N - 1)."""
    sampler, *rest = OVERLOAD.stages
    scenario = dataclasses.replace(
        OVERLOAD,
        source=msgspec.structs.replace(OVERLOAD.source, total_events=50_000, seed=seed),
        stages=(dataclasses.replace(sampler, seed=seed), *rest),
        ending="end",
    )
    ledger = run_scenario(scenario).ledger.snapshot()
    assert ledger.total(Outcome.USER_SAMPLED_OUT) > ledger.produced // 2  # it did most of the shedding
    bound = 5 * math.sqrt((sampler.max_sample_rate - 1) * ledger.produced)
    assert abs(ledger.estimated_true_count() - ledger.produced) <= bound
