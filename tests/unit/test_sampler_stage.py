"""AdaptiveSampler end to end: conservation, unbiased weights, the kernel-gate rule,
pressure, the rate cap and the learned downstream capacity on trio's autojump clock,
one log line per rate change."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
import trio.testing

from pipeline import Batch, BatchSender, BatchSink, NodeSpec, Outcome, Pipeline, Source, StageContext
from pipeline.testing import make_batch, run_stages
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig


def uniform(n_batches: int, size: int, weight: float = 1.0) -> list[Batch]:
    out = []
    for i in range(n_batches):
        batch = make_batch(seq=i, value=np.arange(i * size, (i + 1) * size))
        out.append(batch.replace(weights=np.full(size, weight)) if weight != 1.0 else batch)
    return out


def fixed_rate(n: int, seed: int = 7) -> AdaptiveSamplerConfig:
    return AdaptiveSamplerConfig(min_sample_rate=n, max_sample_rate=n, seed=seed)


# -- user-space sampling ---------------------------------------------------------------------


async def test_user_space_sampling_conserves_events_and_is_unbiased() -> None:
    produced = 100 * 1000
    result = await run_stages([(AdaptiveSampler, fixed_rate(10))], uniform(100, 1000))
    ledger = result.ledger
    delivered = ledger.total(Outcome.DELIVERED)
    sampled_out = ledger.total(Outcome.USER_SAMPLED_OUT)
    assert ledger.pending == 0
    assert delivered + sampled_out == produced
    assert 0.09 * produced < delivered < 0.11 * produced
    # Each kept event stands for 10. The weighted total has a standard deviation of
    # about 1 % here (binomial, p = 0.1); 3 % is over three of them.
    assert {float(w) for b in result.batches for w in np.unique(b.weights)} == {10.0}
    assert ledger.total_weight(Outcome.DELIVERED) == pytest.approx(produced, rel=0.03)
    detail = {(d["outcome"], d["reason"]) for d in ledger.as_dict()["detail"]}  # type: ignore[union-attr]
    assert ("user_sampled_out", "adaptive sampling") in detail


async def test_same_seed_same_sample() -> None:
    first = await run_stages([(AdaptiveSampler, fixed_rate(4, seed=3))], uniform(5, 200))
    second = await run_stages([(AdaptiveSampler, fixed_rate(4, seed=3))], uniform(5, 200))
    assert first.events["value"].tolist() == second.events["value"].tolist()


async def test_events_the_kernel_already_sampled_pass_untouched() -> None:
    result = await run_stages([(AdaptiveSampler, fixed_rate(8))], uniform(10, 100, weight=8.0))
    assert result.ledger.total(Outcome.USER_SAMPLED_OUT) == 0
    assert len(result.events) == 1000
    assert all(np.all(b.weights == 8.0) for b in result.batches)


async def test_user_space_takes_only_what_the_kernel_did_not() -> None:
    # Emitted at an older kernel rate of 2 while the target is 8: keep 1 in 4 more.
    result = await run_stages([(AdaptiveSampler, fixed_rate(8))], uniform(50, 1000, weight=2.0))
    ledger = result.ledger
    assert ledger.pending == 0
    assert 0.22 < len(result.events) / 50_000 < 0.28
    assert all(np.all(b.weights == 8.0) for b in result.batches)
    assert ledger.total_weight(Outcome.DELIVERED) == pytest.approx(100_000, rel=0.03)


async def test_rate_one_passes_batches_through_unchanged() -> None:
    batches = uniform(3, 10)
    result = await run_stages([AdaptiveSampler], batches)
    assert [b is orig for b, orig in zip(result.batches, batches, strict=True)] == [True] * 3


# -- the control loop, on trio's clock -------------------------------------------------------


class PacedSourceConfig(msgspec.Struct, frozen=True):
    batches: int = 100
    size: int = 100
    interval_s: float = 0.01
    then_batches: int = 0
    """A second phase, e.g. a trickle after a burst."""
    then_size: int = 10
    then_interval_s: float = 0.1


class PacedSource(Source):
    """``size`` events every ``interval_s`` (on trio's clock), then the second phase."""

    Config = PacedSourceConfig
    config: PacedSourceConfig

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        task_status.started()
        phases = [
            (cfg.batches, cfg.size, cfg.interval_s),
            (cfg.then_batches, cfg.then_size, cfg.then_interval_s),
        ]
        seq = 0
        for count, size, interval_s in phases:
            for _ in range(count):
                batch = make_batch(seq=seq, value=np.arange(size))
                self.ctx.produced(len(batch))
                await tx.send(batch)
                seq += 1
                await trio.sleep(interval_s)


class LossySource(Source):
    """Like :class:`PacedSource`, but what does not fit in the channel is lost at the origin
    and recorded as ``DRAINED`` (as a ring reader skips records): it never blocks."""

    Config = PacedSourceConfig
    config: PacedSourceConfig

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        task_status.started()
        for seq in range(cfg.batches):
            batch = make_batch(seq=seq, value=np.arange(cfg.size))
            self.ctx.produced(len(batch))
            if tx.send_would_block():
                self.ctx.record_unadmitted(Outcome.DRAINED, len(batch), batch.weight_sum, reason="full")
            else:
                await tx.send(batch)
            await trio.sleep(cfg.interval_s)


class ClockedSinkConfig(msgspec.Struct, frozen=True):
    per_event_s: float = 0.0


class ClockedSink(BatchSink):
    """Takes ``per_event_s`` per event and notes when each batch arrived."""

    Config = ClockedSinkConfig
    config: ClockedSinkConfig

    def __init__(self, config: ClockedSinkConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.arrivals: list[tuple[float, int]] = []

    async def write(self, batch: Batch) -> None:
        await trio.sleep(self.config.per_event_s * len(batch))
        self.arrivals.append((trio.current_time(), len(batch)))


class RecordingGate:
    def __init__(self) -> None:
        self.rates: list[int] = []

    def set_sample_rate(self, n: int) -> None:
        self.rates.append(n)


@pytest.fixture
def sampler_log(capture_log: Callable[[str], list[logging.LogRecord]]) -> list[logging.LogRecord]:
    """Records from ``bpfpipe.sampler``."""
    return capture_log("bpfpipe.sampler")


def fits(offered_per_s: float, capacity_per_s: float, n: int) -> bool:
    """N sends no more than the capacity, and no less than the rate with 10 % headroom."""
    return math.ceil(offered_per_s / capacity_per_s) <= n <= math.ceil(offered_per_s / (0.9 * capacity_per_s))


def build(source: PacedSourceConfig, sampler: AdaptiveSamplerConfig, sink: ClockedSinkConfig) -> Pipeline:
    return Pipeline(
        [
            NodeSpec("source", PacedSource, source),
            NodeSpec("sampler", AdaptiveSampler, sampler),
            NodeSpec("sink", ClockedSink, sink),
        ],
        [4, 4],
    )


async def test_backpressure_raises_the_rate_and_each_change_is_logged_and_pushed_once(
    autojump_clock: trio.testing.MockClock, sampler_log: list[logging.LogRecord]
) -> None:
    # 10 000 events/s into a sink that manages 1 000/s: sampling must absorb the rest.
    pipe = build(
        PacedSourceConfig(batches=2000, size=100, interval_s=0.01),
        AdaptiveSamplerConfig(max_sample_rate=64, seed=1),
        ClockedSinkConfig(per_event_s=1e-3),
    )
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    gate = RecordingGate()
    sampler.attach_gate(gate)
    await pipe.run()

    stats = sampler.statistics()
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0
    assert ledger.total(Outcome.DELIVERED) + ledger.total(Outcome.USER_SAMPLED_OUT) == 200_000
    assert stats.user_sampled_out_events == ledger.total(Outcome.USER_SAMPLED_OUT) > 100_000
    assert stats.rate_changes >= 3
    # Logged once per change of N; the gate saw the start rate, then each change of its
    # rate (the whole part of the exact rate) once.
    changes = [r for r in sampler_log if r.getMessage().startswith("sampling rate")]
    assert len(changes) == stats.rate_changes
    assert gate.rates[0] == 1
    assert all(a != b for a, b in zip(gate.rates[1:], gate.rates[2:], strict=False))
    assert gate.rates[-1] == stats.gate_rate == math.floor(stats.exact_rate)
    # It needs 1 in 10. The sink's capacity C, measured between its takes (no partial
    # batch), holds N in [10 000 / C, 10 000 / (0.9 x C)] (AIMD alone went back and forth:
    # 8, 16, 8, ...), and the exact rate sends 0.95 x C. After a 10 s hold it probes for
    # more, and the probe measures C again.
    assert stats.capacity_per_s == pytest.approx(1000, rel=0.02)
    assert fits(10_000, stats.capacity_per_s, stats.sample_rate)
    assert stats.exact_rate == pytest.approx(10_000 / (0.95 * stats.capacity_per_s))
    assert stats.sample_rate - 1 <= stats.exact_rate < stats.sample_rate
    assert stats.rate_changes <= 8
    # Sampled, but the weights still tell the true volume.
    assert ledger.total_weight(Outcome.DELIVERED) == pytest.approx(200_000, rel=0.1)


async def test_what_the_source_loses_counts_as_offered_and_n_goes_straight_to_what_fits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 10 000 events/s offered, the sink takes 1000/s, the source loses what does not fit.
    # What arrives undercounts the offer ten times; with the losses it is exact, so N goes
    # to ceil(10 000 / (0.95 x C)) (11 for C = 1000) once the capacity C is measured, and stays
    # within what fits.
    pipe = Pipeline(
        [
            NodeSpec("source", LossySource, PacedSourceConfig(batches=2000, size=100, interval_s=0.01)),
            NodeSpec("sampler", AdaptiveSampler, AdaptiveSamplerConfig(seed=1)),
            NodeSpec("sink", ClockedSink, ClockedSinkConfig(per_event_s=1e-3)),
        ],
        [4, 4],
    )
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    gate = RecordingGate()
    sampler.attach_gate(gate)
    await pipe.run()
    stats = sampler.statistics()
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0
    assert ledger.total(Outcome.DRAINED) > 0
    # Measured between the sink's takes of 100-event batches: no partial batch counted.
    assert stats.capacity_per_s == pytest.approx(1000, rel=0.01)
    assert gate.rates[-1] == stats.gate_rate == math.floor(stats.exact_rate)
    assert fits(10_000, stats.capacity_per_s, stats.sample_rate)
    assert max(gate.rates) <= math.ceil(10_000 / (0.9 * stats.capacity_per_s)) + 1  # no overshoot
    assert stats.rate_changes <= 4
    assert stats.last_change is not None
    assert stats.last_change.input_per_s == pytest.approx(10_000, rel=0.1)


async def test_rate_cap_converges_as_stated(autojump_clock: trio.testing.MockClock) -> None:
    # 20 000 events/s, cap 1 000/s: within 2 periods (1 s) the delivered rate must be in
    # [0.81 x cap, cap] (pipeline/sampling.py), give or take binomial noise (~1 % here).
    pipe = build(
        PacedSourceConfig(batches=1000, size=200, interval_s=0.01),
        AdaptiveSamplerConfig(max_events_per_sec=1000, seed=2),
        ClockedSinkConfig(),
    )
    await pipe.run()
    sink = pipe.nodes[-1]
    assert isinstance(sink, ClockedSink)
    start = sink.arrivals[0][0]
    settled = [n for t, n in sink.arrivals if start + 1.0 <= t < start + 9.0]
    rate = sum(settled) / 8.0
    assert 0.81 * 1000 * 0.95 <= rate <= 1000 * 1.05
    assert pipe.statistics().ledger.pending == 0


async def test_the_cap_holds_from_the_first_event(autojump_clock: trio.testing.MockClock) -> None:
    # 10 M events/s at a cap of 1/s: before the first adjustment (0.5 s) N is still 1, and
    # 5 M events arrive; the cap's bucket (burst 1) lets at most 1 + 0.5 + 1 of them through.
    pipe = build(
        PacedSourceConfig(batches=1000, size=10_000, interval_s=0.001),
        AdaptiveSamplerConfig(max_events_per_sec=1, seed=4),
        ClockedSinkConfig(),
    )
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    start = trio.current_time()
    await pipe.run()
    sink = pipe.nodes[-1]
    assert isinstance(sink, ClockedSink)
    assert sum(n for t, n in sink.arrivals if t < start + 0.5) <= 2
    assert sum(n for _, n in sink.arrivals) <= 1 + 1.0 + 1  # all of it took 1 s
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0
    assert ledger.total(Outcome.DELIVERED) + ledger.total(Outcome.USER_SAMPLED_OUT) == 10_000_000
    assert sampler.statistics().rate_capped_events > 0


async def test_what_the_cap_drops_the_kept_weights_carry(autojump_clock: trio.testing.MockClock) -> None:
    # 100 000 events/s at a cap of 1 000/s: the bucket trims the first period (N = 1) to the
    # burst plus the refill, and the kept events' weights still add up to what arrived.
    pipe = build(
        PacedSourceConfig(batches=300, size=1000, interval_s=0.01),
        AdaptiveSamplerConfig(max_events_per_sec=1000, seed=6),
        ClockedSinkConfig(),
    )
    start = trio.current_time()
    await pipe.run()
    sink = pipe.nodes[-1]
    assert isinstance(sink, ClockedSink)
    assert sum(n for t, n in sink.arrivals if t < start + 0.5) <= 500 + 500 + 1
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    assert sampler.statistics().rate_capped_events > 0
    # The bucket's sample is systematic (low variance): 3 % is ample.
    assert ledger.estimated_true_count() == pytest.approx(300_000, rel=0.03)


async def test_pressure_relief_brings_the_rate_back_to_one(autojump_clock: trio.testing.MockClock) -> None:
    # A 3 s burst the sink cannot take, then a trickle it can: N goes up, then back to 1
    # within 11 periods (5.5 s) of the pressure ending.
    burst_then_trickle = PacedSourceConfig(batches=300, size=100, interval_s=0.01, then_batches=300)
    pipe = Pipeline(
        [
            NodeSpec("source", PacedSource, burst_then_trickle),
            NodeSpec("sampler", AdaptiveSampler, AdaptiveSamplerConfig(max_sample_rate=64, seed=5)),
            NodeSpec("sink", ClockedSink, ClockedSinkConfig(per_event_s=1e-3)),
        ],
        [4, 4],
    )
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    gate = RecordingGate()
    sampler.attach_gate(gate)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(2.9)
        peak = sampler.sample_rate
        # Burst over at 3 s; the sink drains the last queued batches within one period.
        await trio.sleep(0.1 + 0.5 + 11 * 0.5)
        assert sampler.sample_rate == 1
        pipe.stop()
    assert peak >= 8
    assert gate.rates[-1] == 1
    assert pipe.statistics().ledger.pending == 0


class StuckSink(BatchSink):
    async def write(self, batch: Batch) -> None:
        await trio.sleep(10.0)


async def test_a_stalled_downstream_is_pressure_even_when_no_batch_moves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The sink sits on its first batch for 10 s: the sampler is stuck in send and sees
    # no batches, but its timer still samples the full channel every period.
    pipe = Pipeline(
        [
            NodeSpec("source", PacedSource, PacedSourceConfig(batches=5, size=10, interval_s=0.0)),
            NodeSpec("sampler", AdaptiveSampler, AdaptiveSamplerConfig(max_sample_rate=64)),
            NodeSpec("sink", StuckSink),
        ],
        [1, 1],
    )
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await trio.sleep(4.1)
        assert sampler.sample_rate == 64  # doubled every 0.5 s (the first period is mixed)
        pipe.abort()
    assert pipe.statistics().ledger.pending == 0


# -- the gate and the config ---------------------------------------------------------------


class BrokenGate:
    def set_sample_rate(self, n: int) -> None:
        raise OSError("map update failed")


async def test_a_failing_gate_is_reported_and_sampling_goes_on() -> None:
    pipe = Pipeline(
        [
            NodeSpec("source", PacedSource, PacedSourceConfig(batches=5, size=100, interval_s=0.0)),
            NodeSpec("sampler", AdaptiveSampler, fixed_rate(5)),
            NodeSpec("sink", ClockedSink),
        ],
        [4, 4],
    )
    sampler = pipe.nodes[1]
    assert isinstance(sampler, AdaptiveSampler)
    sampler.attach_gate(BrokenGate())
    await pipe.run()
    stats = pipe.statistics()
    assert stats.stage("sampler").errors >= 1
    assert "map update failed" in stats.stage("sampler").last_error
    assert 0 < stats.ledger.total(Outcome.USER_SAMPLED_OUT) < 500
    assert stats.ledger.pending == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_sample_rat": 10}, "unknown field"),
        ({"low_fill": 0.8, "high_fill": 0.5}, "low_fill"),
        ({"min_sample_rate": 20, "max_sample_rate": 10}, "min_sample_rate"),
        ({"decrease_factor": 1.5}, "decrease_factor"),
    ],
)
def test_config_errors_name_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, AdaptiveSamplerConfig, strict=True)
