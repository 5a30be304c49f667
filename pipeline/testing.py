"""Helpers for testing stages: a pipeline test in ten lines.

    from pipeline.testing import run_stages, make_batch

    async def test_drops_root_events():
        result = await run_stages([DropRoot], [make_batch(pid=[0, 1, 2])])
        assert result.events["pid"].tolist() == [1, 2]
        assert result.ledger.pending == 0

``TestingSource`` emits the batches you give it (never blocking on anything but
the channel); ``TestingSink`` keeps every batch it receives, in order;
``wait_until`` polls a condition on trio's clock; ``settings`` builds a
pipeline ``Config`` from nested tables (``settings(limits={"max_inflight_events": 0})``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import trio

from ._batch import Batch
from ._channel import BatchSender
from ._graph import NodeSpec, Pipeline, PipelineStatistics
from ._stage import BatchSink, Source, Stage, StageContext
from .accounting import LedgerSnapshot
from .config import Config, decode_config

__all__ = [
    "RunResult",
    "TestingSink",
    "TestingSource",
    "make_batch",
    "run_stages",
    "settings",
    "wait_until",
]


def settings(**tables: Mapping[str, Any] | Any) -> Config:
    """A validated pipeline config from top-level keys and nested tables, e.g.
    ``settings(limits={"max_inflight_events": 0, "max_memory_mb": 0})``."""
    return decode_config(tables)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, poll_s: float = 0.002) -> None:
    """Return once ``predicate()`` is true; fail (``trio.TooSlowError``) after ``timeout`` s."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll_s)


def make_batch(source: str = "test", seq: int = 0, **columns: Sequence[Any]) -> Batch:
    """A batch from equal-length columns, e.g. ``make_batch(pid=[1, 2], value=[10, 20])``."""
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns differ in length: { {k: len(v) for k, v in arrays.items()} }")
    dtype = np.dtype([(name, a.dtype) for name, a in arrays.items()])
    events = np.zeros(lengths.pop() if lengths else 0, dtype=dtype)
    for name, a in arrays.items():
        events[name] = a
    return Batch(events, source=source, seq=seq)


class TestingSourceConfig(msgspec.Struct, frozen=True):
    __test__ = False

    batches: tuple[Any, ...] = ()


class TestingSource(Source):
    """Sends the configured batches in order, then ends the stream."""

    __test__ = False  # not a pytest test class

    Config = TestingSourceConfig
    config: TestingSourceConfig

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        for batch in self.config.batches:
            self.ctx.produced(len(batch), batch.weight_sum)
            await tx.send(batch)


class TestingSink(BatchSink):
    """Keeps every batch it receives."""

    __test__ = False

    def __init__(self, config: Any, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.batches: list[Batch] = []

    async def write(self, batch: Batch) -> None:
        self.batches.append(batch)


@dataclass
class RunResult:
    batches: list[Batch]
    statistics: PipelineStatistics
    ledger: LedgerSnapshot = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = self.statistics.ledger

    @property
    def events(self) -> np.ndarray:
        if not self.batches:
            return np.zeros(0)
        return np.concatenate([b.events for b in self.batches])


async def run_stages(
    stages: Sequence[type[Stage] | tuple[type[Stage], Any]],
    batches: Sequence[Batch],
    *,
    capacity: int = 4,
    pipeline_settings: Config | None = None,
) -> RunResult:
    """Run ``TestingSource(batches) → stages… → TestingSink`` to completion, with
    ``pipeline_settings`` (default: an unbounded in-flight budget)."""
    specs = [NodeSpec("source", TestingSource, TestingSourceConfig(tuple(batches)))]
    for i, entry in enumerate(stages):
        cls, config = entry if isinstance(entry, tuple) else (entry, None)
        specs.append(NodeSpec(f"{cls.__name__}-{i}", cls, config))
    specs.append(NodeSpec("sink", TestingSink))
    if pipeline_settings is None:
        pipeline_settings = settings(limits={"max_inflight_events": 0, "max_inflight_bytes": 0})
    pipe = Pipeline(specs, [capacity] * (len(specs) - 1), settings=pipeline_settings)
    await pipe.run()
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    return RunResult(sink.batches, pipe.statistics())
