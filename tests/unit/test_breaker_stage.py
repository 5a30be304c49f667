"""CircuitBreakerStage / CircuitBreakerSink end to end: failing batches reach the fallback,
the breaker opens, recovers through one half-open trial on trio's autojump clock, timeouts
count as failures, and every event ends in exactly one outcome."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
import trio.testing

from pipeline import (
    Batch,
    BatchSender,
    BatchSink,
    BatchStage,
    NodeSpec,
    Outcome,
    Pipeline,
    Source,
    StageContext,
)
from pipeline.breaker import BreakerState
from pipeline.errors import StageLoadError
from pipeline.testing import TestingSink, make_batch, run_stages
from stages.breaker import CircuitBreakerConfig, CircuitBreakerSink, CircuitBreakerStage
from stages.spool_sink import SPOOL_FULL, SpoolSink

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def numbered(n_batches: int, size: int) -> list[Batch]:
    return [make_batch(seq=i, value=np.arange(i * size, (i + 1) * size)) for i in range(n_batches)]


def outcomes(pipe_or_ledger: Any) -> dict[tuple[str, str], int]:
    ledger = pipe_or_ledger.statistics().ledger if isinstance(pipe_or_ledger, Pipeline) else pipe_or_ledger
    return {(d["outcome"], d["reason"]): d["count"] for d in ledger.as_dict()["detail"]}


def spool_values(path: Path) -> list[int]:
    return [json.loads(line)["value"] for line in path.read_bytes().splitlines()]


# -- primaries -------------------------------------------------------------------------------


class AlwaysFails(BatchStage):
    def process(self, batch: Batch) -> Batch:
        raise ConnectionError("collector unreachable")


class FailsUntilConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    until_s: float = 15.0
    """Fail while trio's clock reads less than this."""


class FailsUntil(BatchStage):
    Config = FailsUntilConfig
    config: FailsUntilConfig

    def process(self, batch: Batch) -> Batch:
        if trio.current_time() < self.config.until_s:
            raise ConnectionError("collector unreachable")
        return batch


class FailsOnOdd(BatchStage):
    def process(self, batch: Batch) -> Batch:
        if batch.seq % 2:
            raise ConnectionError("odd batch")
        return batch


class DropsOdd(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch.select(batch.events["value"] % 2 == 0)


class SlowSync(BatchStage):
    """Takes 2 s of (mock) clock time per batch, then returns it."""

    def process(self, batch: Batch) -> Batch:
        trio.lowlevel.current_clock().jump(2.0)  # type: ignore[attr-defined]
        return batch


class SlowAsync(BatchStage):
    """An async primary: hangs 10 s on odd batches."""

    async def process(self, batch: Batch) -> Batch:  # type: ignore[override]
        if batch.seq % 2:
            await trio.sleep(10.0)
        return batch


class FlakyExporter(BatchSink):
    """A sink primary: fails on batches whose seq is in ``failing``."""

    failing: set[int] = set()

    def __init__(self, config: Any, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.written: list[int] = []

    async def write(self, batch: Batch) -> None:
        if batch.seq in self.failing:
            raise OSError("export failed")
        self.written.append(batch.seq)


class BrokenFallback(BatchSink):
    async def write(self, batch: Batch) -> None:
        raise OSError("disk full")


# -- sources ---------------------------------------------------------------------------------


class TickingSourceConfig(msgspec.Struct, frozen=True):
    batches: int = 30
    size: int = 10
    interval_s: float = 1.0


class TickingSource(Source):
    """One batch at t = 0, 1, 2, … (trio's clock), seq = its index."""

    Config = TickingSourceConfig
    config: TickingSourceConfig

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        task_status.started()
        start = trio.current_time()
        for i in range(cfg.batches):
            await trio.sleep_until(start + i * cfg.interval_s)
            batch = make_batch(seq=i, value=np.arange(i * cfg.size, (i + 1) * cfg.size))
            self.ctx.produced(len(batch))
            await tx.send(batch)


@pytest.fixture
def breaker_log(capture_log: Callable[[str], list[logging.LogRecord]]) -> list[logging.LogRecord]:
    """Records from ``bpfpipe.breaker``."""
    return capture_log("bpfpipe.breaker")


def spool_to(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any]:
    return {"path": str(path), "max_bytes": max_bytes}


# -- tests -----------------------------------------------------------------------------------


async def test_failing_primary_goes_to_the_fallback_and_opens_the_breaker(
    tmp_path: Path, breaker_log: list[logging.LogRecord]
) -> None:
    spool = tmp_path / "spool.jsonl"
    config = CircuitBreakerConfig(fallback_config=spool_to(spool))
    guarded = CircuitBreakerStage.around(AlwaysFails)
    result = await run_stages([(guarded, config)], numbered(20, 5))

    assert result.batches == []  # nothing reached the sink...
    assert spool_values(spool) == list(range(100))  # ...and nothing was lost
    ledger = result.ledger
    assert ledger.pending == 0
    assert outcomes(ledger) == {
        ("fallback", "primary failed"): 25,  # the 5 failures that opened the breaker
        ("fallback", "circuit open"): 75,  # no time passes here, so it stays open
    }
    stats = result.statistics.stage("CircuitBreakerStage[AlwaysFails]-0")
    assert stats.errors == 5
    assert "collector unreachable" in stats.last_error
    warnings = [r for r in breaker_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "opened" in warnings[0].getMessage()


async def test_recovers_through_one_half_open_trial(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, breaker_log: list[logging.LogRecord]
) -> None:
    # Batches at t = 0..29 s; the primary fails before t = 15. Threshold 2, reset 10 s:
    # open at t=1; trial at t=11 fails (open again); trial at t=21 succeeds (closed).
    spool = tmp_path / "spool.jsonl"
    config = CircuitBreakerConfig(
        failure_threshold=2,
        reset_timeout_s=10.0,
        fallback_config=spool_to(spool),
    )
    pipe = Pipeline(
        [
            NodeSpec("source", TickingSource, TickingSourceConfig(batches=30, size=10)),
            NodeSpec("guard", CircuitBreakerStage.around(FailsUntil, {"until_s": 15.0}), config),
            NodeSpec("sink", TestingSink),
        ],
        [4, 4],
    )
    await pipe.run()
    guard = pipe.nodes[1]
    sink = pipe.nodes[2]
    assert isinstance(guard, CircuitBreakerStage)
    assert isinstance(sink, TestingSink)

    assert [(t.at, t.old, t.new) for t in guard.breaker.history] == [
        (1.0, CLOSED, OPEN),
        (11.0, OPEN, HALF_OPEN),
        (11.0, HALF_OPEN, OPEN),
        (21.0, OPEN, HALF_OPEN),
        (21.0, HALF_OPEN, CLOSED),
    ]
    assert [b.seq for b in sink.batches] == list(range(21, 30))
    assert spool_values(spool) == list(range(0, 210))
    assert outcomes(pipe) == {
        ("fallback", "primary failed"): 30,  # t = 0, 1 and the failed trial at 11
        ("fallback", "circuit open"): 180,  # t = 2..10 and 12..20
        ("delivered", ""): 90,
    }
    stats = guard.statistics()
    assert stats.state is CLOSED
    assert (stats.breaker.opened, stats.breaker.trials, stats.primary_errors) == (2, 2, 3)
    assert (stats.fallback_batches, stats.fallback_events) == (21, 210)
    assert [r.levelname for r in breaker_log] == ["WARNING", "INFO", "WARNING", "INFO", "INFO"]
    assert pipe.statistics().ledger.pending == 0


async def test_primary_results_are_forwarded_and_filtering_is_accounted(tmp_path: Path) -> None:
    config = CircuitBreakerConfig(fallback_config=spool_to(tmp_path / "s.jsonl"))
    result = await run_stages([(CircuitBreakerStage.around(DropsOdd), config)], numbered(4, 10))
    assert result.events["value"].tolist() == list(range(0, 40, 2))
    assert outcomes(result.ledger) == {("delivered", ""): 20, ("stage_dropped", "filtered"): 20}


async def test_slow_sync_primary_counts_as_failure_but_its_result_is_used(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    config = CircuitBreakerConfig(
        failure_threshold=3, stage_timeout_s=1.0, fallback_config=spool_to(tmp_path / "s.jsonl")
    )
    result = await run_stages([(CircuitBreakerStage.around(SlowSync), config)], numbered(5, 10))
    # Three slow batches are delivered (and open the breaker); the last two are spooled.
    assert outcomes(result.ledger) == {("delivered", ""): 30, ("fallback", "circuit open"): 20}
    assert [b.seq for b in result.batches] == [0, 1, 2]


async def test_async_primary_over_the_deadline_is_cancelled_and_spooled(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    spool = tmp_path / "s.jsonl"
    config = CircuitBreakerConfig(stage_timeout_s=1.0, fallback_config=spool_to(spool))
    pipe = Pipeline(
        [
            NodeSpec("source", TickingSource, TickingSourceConfig(batches=6, size=10, interval_s=0.0)),
            NodeSpec("guard", CircuitBreakerStage.around(SlowAsync), config),
            NodeSpec("sink", TestingSink),
        ],
        [4, 4],
    )
    start = trio.current_time()
    await pipe.run()
    assert trio.current_time() - start == pytest.approx(3.0)  # three 1 s deadlines, not 30 s
    sink = pipe.nodes[2]
    assert isinstance(sink, TestingSink)
    assert [b.seq for b in sink.batches] == [0, 2, 4]
    assert spool_values(spool) == [v for seq in (1, 3, 5) for v in range(seq * 10, seq * 10 + 10)]
    assert outcomes(pipe) == {("delivered", ""): 30, ("fallback", "primary timed out"): 30}
    guard = pipe.nodes[1]
    assert isinstance(guard, CircuitBreakerStage)
    assert guard.statistics().primary_timeouts == 3
    assert guard.breaker.state is CLOSED  # successes in between end each streak


async def test_full_spool_counts_overflow_as_dropped(tmp_path: Path) -> None:
    spool = tmp_path / "s.jsonl"
    config = CircuitBreakerConfig(fallback_config=spool_to(spool, max_bytes=400))
    result = await run_stages([(CircuitBreakerStage.around(AlwaysFails), config)], numbered(10, 10))
    kept = len(spool_values(spool))
    assert 0 < kept < 100
    assert spool.stat().st_size <= 400
    counts = outcomes(result.ledger)
    assert counts[("stage_dropped", SPOOL_FULL)] == 100 - kept
    assert result.ledger.total(Outcome.FALLBACK) == kept
    assert result.ledger.pending == 0


async def test_a_failing_fallback_drops_with_reason_and_never_kills_the_pipeline() -> None:
    guarded = CircuitBreakerStage.around(AlwaysFails, fallback=BrokenFallback)
    result = await run_stages([(guarded, CircuitBreakerConfig())], numbered(3, 10))
    assert outcomes(result.ledger) == {("stage_dropped", "fallback failed"): 30}
    assert result.statistics.stage("CircuitBreakerStage[AlwaysFails]-0").errors == 6
    assert result.ledger.pending == 0


async def test_a_batch_sink_can_be_the_fallback() -> None:
    guarded = CircuitBreakerStage.around(AlwaysFails, fallback=TestingSink)
    result = await run_stages([(guarded, CircuitBreakerConfig())], numbered(3, 10))
    assert result.batches == []
    assert outcomes(result.ledger) == {("fallback", "primary failed"): 30}
    stats = result.statistics.stage("CircuitBreakerStage[AlwaysFails]-0")
    assert (stats.errors, stats.dropped_events) == (3, 30)


async def test_import_paths_work_like_any_stage_config(tmp_path: Path) -> None:
    spool = tmp_path / "s.jsonl"
    config = msgspec.convert(
        {"primary": f"{__name__}:AlwaysFails", "fallback_config": spool_to(spool), "failure_threshold": 1},
        CircuitBreakerConfig,
        strict=True,
    )
    result = await run_stages([(CircuitBreakerStage, config)], numbered(3, 4))
    assert outcomes(result.ledger) == {("fallback", "primary failed"): 4, ("fallback", "circuit open"): 8}
    assert len(spool_values(spool)) == 12


async def test_breaker_sink_wraps_an_exporter(tmp_path: Path) -> None:
    spool = tmp_path / "s.jsonl"
    FlakyExporter.failing = {1, 2}
    pipe = Pipeline(
        [
            NodeSpec("source", TickingSource, TickingSourceConfig(batches=5, interval_s=0.0)),
            NodeSpec(
                "export",
                CircuitBreakerSink.around(FlakyExporter),
                CircuitBreakerConfig(fallback_config=spool_to(spool)),
            ),
        ],
        [4],
    )
    await pipe.run()
    guard = pipe.nodes[1]
    assert isinstance(guard, CircuitBreakerSink)
    assert isinstance(guard.guard.primary, FlakyExporter)
    assert guard.guard.primary.written == [0, 3, 4]
    assert spool_values(spool) == list(range(10, 30))
    assert outcomes(pipe) == {("delivered", ""): 30, ("fallback", "primary failed"): 20}
    assert pipe.statistics().ledger.pending == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (CircuitBreakerConfig(), "needs a primary"),
        (CircuitBreakerConfig(primary="pipeline.testing:TestingSink"), "is not a stage with process"),
        (CircuitBreakerConfig(primary="no.such.module:X"), "cannot import 'no.such.module'"),
        (
            CircuitBreakerConfig(primary=f"{__name__}:FailsUntil", primary_config={"until": 3}),
            "config.primary_config.until: unknown key",
        ),
        (
            CircuitBreakerConfig(
                primary=f"{__name__}:AlwaysFails", fallback="pipeline.testing:TestingSource"
            ),
            "is not a sink with spool",
        ),
    ],
)
async def test_bad_wiring_fails_at_build_time_with_one_line(
    config: CircuitBreakerConfig, message: str
) -> None:
    with pytest.raises(StageLoadError, match=message) as info:
        await run_stages([(CircuitBreakerStage, config)], [])
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("stage 'CircuitBreakerStage-0'")


def test_config_is_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="failure_threshold"):
        msgspec.convert({"primary": "x:Y", "failure_threshold": 0}, CircuitBreakerConfig, strict=True)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"primary": "x:Y", "timeout_s": 1}, CircuitBreakerConfig, strict=True)


async def test_default_fallback_is_a_spool_file_per_breaker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert CircuitBreakerConfig().fallback == f"{SpoolSink.__module__}:{SpoolSink.__name__}"
    monkeypatch.chdir(tmp_path)
    first = CircuitBreakerConfig(primary=f"{__name__}:FailsOnOdd")
    second = CircuitBreakerConfig(primary=f"{__name__}:AlwaysFails")
    await run_stages([(CircuitBreakerStage, first), (CircuitBreakerStage, second)], numbered(4, 3))
    # Odd batches stop at the first breaker, even ones at the second: one file each.
    assert spool_values(tmp_path / "bpfpipe-spool-CircuitBreakerStage-0.jsonl") == [3, 4, 5, 9, 10, 11]
    assert spool_values(tmp_path / "bpfpipe-spool-CircuitBreakerStage-1.jsonl") == [0, 1, 2, 6, 7, 8]
