"""Resource limits: the pure ``ResourceGovernor`` (hysteresis, transitions only, map
trimming, counts), the ``ResourceEnforcer`` shell in a running pipeline (fake RSS
readings and fake BPF programs published as ``bpf_program`` services), and the
sampler taking ``limits.max_events_per_sec`` as its cap."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from pipeline import Config, NodeSpec, Outcome, Pipeline, StageContext
from pipeline._channel import InflightBudget
from pipeline._enforcer import ResourceEnforcer
from pipeline.accounting import Ledger
from pipeline.config import LimitsConfig
from pipeline.limits import EvictMap, MemoryPressure, ResourceGovernor
from stages.null_sink import NullSink
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig
from stages.synthetic import SyntheticConfig, SyntheticSource

MiB = 1024 * 1024

# -- the pure governor -------------------------------------------------------------------------


def test_memory_pressure_turns_on_past_the_limit_and_off_below_the_release_fraction() -> None:
    gov = ResourceGovernor(max_memory_bytes=100 * MiB, max_map_entries=0, release_fraction=0.9)
    assert gov.evaluate(100 * MiB, {}) == []  # at the limit is not past it
    assert gov.evaluate(100 * MiB + 1, {}) == [MemoryPressure(True, 100 * MiB + 1, 100 * MiB)]
    assert gov.memory_pressure
    # transitions only: no action while it stays on, including inside the hysteresis band
    assert gov.evaluate(200 * MiB, {}) == []
    assert gov.evaluate(95 * MiB, {}) == []
    assert gov.evaluate(90 * MiB, {}) == []  # at the release point is not below it
    assert gov.memory_pressure
    assert gov.evaluate(90 * MiB - 1, {}) == [MemoryPressure(False, 90 * MiB - 1, 100 * MiB)]
    assert not gov.memory_pressure
    assert gov.evaluate(95 * MiB, {}) == []  # below the limit: stays off
    assert gov.evaluate(101 * MiB, {}) == [MemoryPressure(True, 101 * MiB, 100 * MiB)]
    assert gov.counts == {"memory_pressure_on": 2, "memory_pressure_off": 1}


def test_no_memory_limit_means_no_pressure() -> None:
    gov = ResourceGovernor(max_memory_bytes=0, max_map_entries=0)
    assert gov.evaluate(1 << 40, {}) == []
    assert not gov.memory_pressure and gov.counts == {}


def test_maps_over_the_limit_are_trimmed_to_the_trim_fraction_in_a_stable_order() -> None:
    gov = ResourceGovernor(max_memory_bytes=0, max_map_entries=1000, trim_fraction=0.9)
    entries = {("xdp", "rate_limit_state"): 5000, ("exec", "other"): 1000, ("exec", "exec_procs"): 1001}
    actions = gov.evaluate(0, entries)
    assert actions == [
        EvictMap("exec", "exec_procs", 1001, 900),  # sorted by (program, map)
        EvictMap("xdp", "rate_limit_state", 5000, 900),
    ]  # exactly at the limit is not over it
    # Not transitions-only: a map still over the limit next period is trimmed again.
    assert gov.evaluate(0, {("xdp", "rate_limit_state"): 1200}) == [
        EvictMap("xdp", "rate_limit_state", 1200, 900)
    ]
    assert gov.evaluate(0, {("xdp", "rate_limit_state"): 900}) == []
    assert gov.counts == {"EvictMap": 3}


def test_memory_and_maps_are_judged_in_the_same_period() -> None:
    gov = ResourceGovernor(max_memory_bytes=10 * MiB, max_map_entries=10)
    actions = gov.evaluate(11 * MiB, {("p", "m"): 11})
    assert actions == [MemoryPressure(True, 11 * MiB, 10 * MiB), EvictMap("p", "m", 11, 9)]
    assert gov.counts == {"memory_pressure_on": 1, "EvictMap": 1}
    assert (
        ResourceGovernor(max_memory_bytes=0, max_map_entries=0).evaluate(1 << 40, {("p", "m"): 1 << 30}) == []
    )


# -- the enforcer shell --------------------------------------------------------------------------


class FakeMapProgram:
    """What the enforcer uses of a loaded BPF program: its growing maps and eviction."""

    def __init__(self, name: str, maps: dict[str, int]) -> None:
        self.name = name
        self.closed = False
        self.maps = dict(maps)
        self.evictions: list[tuple[str, int]] = []
        self.fail: Exception | None = None
        self.reads = 0

    def growing_maps(self) -> dict[str, int]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return dict(self.maps)

    def evict_oldest(self, map_name: str, keep: int) -> int:
        self.evictions.append((map_name, keep))
        deleted = max(0, self.maps[map_name] - keep)
        self.maps[map_name] -= deleted
        return deleted


class Rss:
    """A settable RSS reading; raises ``error`` instead while it is set."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.error: Exception | None = None
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.value


INTERVAL_S = 0.5


def running_pipeline(rss: Rss, *programs: FakeMapProgram) -> tuple[Pipeline, ResourceEnforcer]:
    """Synthetic events through a pipeline whose limits are 100 MiB and 1000 map entries,
    with the resource enforcer composed in as ``build_pipeline`` does."""
    limits = LimitsConfig(max_memory_mb=100, max_map_entries=1000, enforce_interval_s=INTERVAL_S)
    enforcer = ResourceEnforcer(limits, read_rss=rss)
    pipe = Pipeline(
        [
            NodeSpec("source", SyntheticSource, SyntheticConfig(rate_per_s=1000, batch_size=50)),
            NodeSpec("sink", NullSink),
        ],
        [4],
        settings=Config(limits=limits),
        helpers=[enforcer.run],
    )
    for program in programs:
        pipe.contexts[0].publish(program)  # what a reader does when it starts
    return pipe, enforcer


async def next_period() -> None:
    await trio.sleep(INTERVAL_S)


async def test_enforcer_sets_memory_pressure_with_hysteresis_and_trims_maps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rss = Rss(50 * MiB)
    program = FakeMapProgram("exec", {"exec_procs": 500})
    pipe, enforcer = running_pipeline(rss, program)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(INTERVAL_S / 2)  # between two checks from here on
        assert not pipe.pressure.memory and pipe.pressure.rss_bytes == 50 * MiB
        assert program.evictions == []

        rss.value = 150 * MiB
        program.maps["exec_procs"] = 2500
        await next_period()
        assert pipe.pressure.memory and pipe.pressure.rss_bytes == 150 * MiB
        assert program.evictions == [("exec_procs", 900)] and program.maps["exec_procs"] == 900
        assert enforcer.evicted_entries == 1600

        rss.value = 95 * MiB  # under the limit, above 90 %: still under pressure
        await next_period()
        assert pipe.pressure.memory and pipe.pressure.rss_bytes == 95 * MiB

        rss.value = 80 * MiB
        await next_period()
        assert not pipe.pressure.memory
        assert program.evictions == [("exec_procs", 900)]  # under the limit since: left alone
        pipe.stop()
    assert enforcer.counts == {"memory_pressure_on": 1, "memory_pressure_off": 1, "EvictMap": 1}
    assert pipe.ledger.snapshot().pending == 0


async def test_closed_programs_are_left_alone(autojump_clock: trio.testing.MockClock) -> None:
    gone = FakeMapProgram("gone", {"m": 5000})
    gone.closed = True  # its reader has shut down
    live = FakeMapProgram("live", {"m": 10})
    pipe, enforcer = running_pipeline(Rss(0), gone, live)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(3.5 * INTERVAL_S)
        pipe.stop()
    assert gone.reads == 0 and gone.evictions == []
    assert live.reads == 4  # one check at start, then one per period
    assert enforcer.counts == {}


async def test_a_failing_check_is_logged_and_the_pipeline_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rss = Rss(150 * MiB)
    rss.error = OSError("/proc is not mounted")
    pipe, _ = running_pipeline(rss)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(2.5 * INTERVAL_S)
        failed = [r for r in caplog.records if r.name == "bpfpipe.limits" and r.levelno == logging.ERROR]
        assert failed and "resource check failed: OSError: /proc is not mounted" in failed[0].getMessage()
        assert rss.reads == 3  # it kept checking every period
        assert not pipe.pressure.memory
        delivered = pipe.ledger.snapshot().total(Outcome.DELIVERED)
        assert delivered > 0  # events kept flowing

        rss.error = None  # the next check works again
        await next_period()
        assert pipe.pressure.memory
        assert pipe.ledger.snapshot().total(Outcome.DELIVERED) > delivered
        pipe.stop()
    assert pipe.ledger.snapshot().pending == 0


async def test_a_program_whose_maps_cannot_be_read_does_not_disable_the_other_limits(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = FakeMapProgram("broken", {"m": 5000})
    broken.fail = OSError("map fd closed")
    healthy = FakeMapProgram("healthy", {"m": 5000})
    pipe, _ = running_pipeline(Rss(150 * MiB), broken, healthy)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(INTERVAL_S / 2)
        assert pipe.pressure.memory  # memory is protected whatever one program does
        assert healthy.evictions == [("m", 900)]
        assert broken.evictions == []
        pipe.stop()
    assert any("broken" in r.getMessage() and "map fd closed" in r.getMessage() for r in caplog.records)


class RingOnlyProgram:
    """A program as a reader's ``RingProgram`` contract describes it: no growing maps."""

    name = "ring-only"
    closed = False


async def test_a_program_without_growing_maps_is_fine(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    pipe, _ = running_pipeline(Rss(150 * MiB))
    # Typed wiring: a program with nothing to trim is no TrimmableMaps, and publishing
    # something that implements no service protocol fails at once (the reader checks first).
    with pytest.raises(TypeError, match="implements no service protocol"):
        pipe.contexts[0].publish(RingOnlyProgram())
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(INTERVAL_S / 2)
        assert pipe.pressure.memory
        pipe.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_failing_eviction_does_not_keep_other_maps_from_being_trimmed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    first = FakeMapProgram("a", {"m": 5000})  # sorted first, so evicted first

    def refuse(map_name: str, keep: int) -> int:
        raise OSError("EPERM")

    first.evict_oldest = refuse  # type: ignore[method-assign]
    second = FakeMapProgram("b", {"m": 5000})
    pipe, _ = running_pipeline(Rss(0), first, second)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(INTERVAL_S / 2)
        assert second.evictions == [("m", 900)]
        pipe.stop()
    assert any("EPERM" in r.getMessage() for r in caplog.records)


# -- the sampler's cap ---------------------------------------------------------------------------


def sampler_with(config: AdaptiveSamplerConfig, limit_per_s: int) -> AdaptiveSampler:
    settings = Config(limits=LimitsConfig(max_events_per_sec=limit_per_s))
    ctx = StageContext("sampler", "stage", Ledger(), InflightBudget(), settings=settings)
    return AdaptiveSampler(config, ctx)


def cap_with(limit_per_s: int, **config: Any) -> float:
    return sampler_with(AdaptiveSamplerConfig(**config), limit_per_s).policy.params.max_events_per_sec


def test_sampler_inherits_the_pipeline_rate_limit_when_its_own_cap_is_unset() -> None:
    assert cap_with(500) == 500
    assert cap_with(500, max_events_per_sec=200) == 200  # its own cap wins
    assert cap_with(500, max_events_per_sec=0) == 0  # including "no cap"


def capped_pipeline(limit_per_s: int) -> Pipeline:
    return Pipeline(
        [
            NodeSpec(
                "source",
                SyntheticSource,
                SyntheticConfig(rate_per_s=20_000, batch_size=100, total_events=40_000),
            ),
            NodeSpec(
                "sampler", AdaptiveSampler, AdaptiveSamplerConfig(adjust_period_s=0.1, high_lag_s=0, seed=3)
            ),
            NodeSpec("sink", NullSink),
        ],
        [64, 64],  # roomy: only the cap can raise the rate
        settings=Config(limits=LimitsConfig(max_events_per_sec=limit_per_s)),
    )


@pytest.mark.parametrize(("limit_per_s", "check"), [(1000, lambda d: d < 5000), (0, lambda d: d == 40_000)])
async def test_the_inherited_cap_limits_what_is_delivered(
    autojump_clock: trio.testing.MockClock, limit_per_s: int, check: Callable[[int], bool]
) -> None:
    pipe = capped_pipeline(limit_per_s)
    await pipe.run()  # 2 s of events at 20 000/s
    snap = pipe.ledger.snapshot()
    delivered = snap.total(Outcome.DELIVERED)
    assert check(delivered), delivered
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    if limit_per_s:
        assert sampler.sample_rate >= 15  # 20 000/s down to about 1 000/s
    else:
        assert sampler.sample_rate == 1
    assert snap.pending == 0
