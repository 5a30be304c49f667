"""Random stage chains with random channel capacities deliver every event exactly
once and in order, channel occupancy never exceeds capacity, and the ledger balances."""

from __future__ import annotations

import numpy as np
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from pipeline import Batch, BatchReceiver, BatchSender, BatchStage, NodeSpec, Pipeline, Stage
from pipeline.testing import TestingSink, TestingSource, TestingSourceConfig, make_batch
from stages.noop import NoopStage


class Rebatch(Stage):
    """Full-control stage: splits each batch in two (exercises run()-style stages)."""

    async def run(self, rx: BatchReceiver, tx: BatchSender, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for batch in rx:
            half = len(batch) // 2
            for part in (batch.select(slice(0, half)), batch.select(slice(half, None))):
                await tx.send(part)


class Sleepy(BatchStage):
    """Takes a little (virtual) time per batch; makes queues fill up."""

    async def run(self, rx: BatchReceiver, tx: BatchSender, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for batch in rx:
            await trio.sleep(0.001 * (batch.seq % 3))
            await tx.send(batch)

    def process(self, batch: Batch) -> Batch:
        return batch


class Checked(BatchStage):
    """Checks, at every batch, that no channel holds more than its capacity."""

    pipe: Pipeline | None = None

    def process(self, batch: Batch) -> Batch:
        assert Checked.pipe is not None
        for edge in Checked.pipe.edges:
            assert edge.depth <= edge.capacity
        return batch


STAGES = {"noop": NoopStage, "rebatch": Rebatch, "sleepy": Sleepy, "checked": Checked}


@given(
    chain=st.lists(st.sampled_from(sorted(STAGES)), max_size=6),
    capacities=st.lists(st.integers(1, 5), min_size=7, max_size=7),
    sizes=st.lists(st.integers(0, 40), max_size=30),
)
def test_exactly_once_in_order(chain: list[str], capacities: list[int], sizes: list[int]) -> None:
    batches = []
    start = 0
    for i, size in enumerate(sizes):
        batches.append(make_batch(seq=i, value=np.arange(start, start + size, dtype=np.int64)))
        start += size
    specs = [NodeSpec("src", TestingSource, TestingSourceConfig(tuple(batches)))]
    specs += [NodeSpec(f"{name}{i}", STAGES[name]) for i, name in enumerate(chain)]
    specs.append(NodeSpec("sink", TestingSink))
    pipe = Pipeline(specs, capacities[: len(specs) - 1])
    Checked.pipe = pipe
    trio.run(pipe.run, clock=trio.testing.MockClock(autojump_threshold=0))

    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    delivered = np.concatenate([b.events["value"] for b in sink.batches]) if sink.batches else np.array([])
    assert delivered.tolist() == list(range(start))
    stats = pipe.statistics()
    for edge in stats.edges:
        assert edge.peak_depth <= edge.capacity
        assert edge.queued_events == 0 and edge.depth == 0
    assert stats.ledger.produced == start
    assert stats.ledger.pending == 0
    assert stats.budget.events == 0
