"""Test doubles for switching the stage chain live (``Pipeline.replace_chain``).

Every event carries a ``seq`` (0, 1, 2, … in the order the source made them), so a
test can say exactly where each one ended: delivered by a sink (in what order),
removed by a filter, or never sent. :func:`check_exactly_once` is that check.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import trio

from pipeline import Batch, BatchSender, BatchSink, BatchStage, Outcome, Pipeline, Source, StageContext

SEQ_DTYPE = np.dtype([("seq", "<u8"), ("value", "<u8")])


class SeqSourceConfig(msgspec.Struct, frozen=True):
    batch_size: int = 8
    interval_s: float = 0.001
    """Pause between batches (trio's clock): a steady load, not a flood."""
    total_events: int = 0
    """0: until stopped."""
    publish: Any = None
    """A service to publish before starting (e.g. a sampling gate)."""


class SeqSource(Source):
    """Sends numbered events with ``await tx.send`` (so a send can be in progress, blocked
    on a full channel, when the switch comes). Counts how often it was run."""

    Config = SeqSourceConfig
    config: SeqSourceConfig

    def __init__(self, config: SeqSourceConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.runs = 0

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.runs += 1
        cfg = self.config
        if cfg.publish is not None:
            self.ctx.publish(cfg.publish)
        task_status.started()
        seq = 0
        batch_no = 0
        while cfg.total_events == 0 or seq < cfg.total_events:
            n = cfg.batch_size if cfg.total_events == 0 else min(cfg.batch_size, cfg.total_events - seq)
            events = np.zeros(n, dtype=SEQ_DTYPE)
            events["seq"] = np.arange(seq, seq + n)
            seq += n
            self.ctx.produced(n)
            await tx.send(Batch(events, source=self.ctx.name, seq=batch_no))
            batch_no += 1
            await trio.sleep(cfg.interval_s)


class SeqFilterConfig(msgspec.Struct, frozen=True):
    modulus: int = 2
    """Keep events whose ``seq % modulus == 0``."""


class SeqFilter(BatchStage):
    """Keeps every ``modulus``-th seq; remembers the seqs it removed."""

    Config = SeqFilterConfig
    config: SeqFilterConfig

    def __init__(self, config: SeqFilterConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.removed: list[int] = []

    def process(self, batch: Batch) -> Batch:
        keep = batch.events["seq"] % self.config.modulus == 0
        self.removed += batch.events["seq"][~keep].tolist()
        return batch.select(keep)


class RecordingSinkConfig(msgspec.Struct, frozen=True):
    per_batch_s: float = 0.0
    """Time to write one batch (trio's clock): a slow sink lets the channels fill."""


_WRITE_ORDER = itertools.count()


def written(sinks: Sequence[RecordingSink]) -> list[int]:
    """The seqs these sinks wrote, in the order they were written (as if to one output)."""
    return [s for _, seqs in sorted(w for sink in sinks for w in sink.writes) for s in seqs]


class RecordingSink(BatchSink):
    """Keeps the seqs it writes, in order; can be slow."""

    Config = RecordingSinkConfig
    config: RecordingSinkConfig

    def __init__(self, config: RecordingSinkConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.seqs: list[int] = []
        self.writes: list[tuple[int, list[int]]] = []
        """(when, seqs) per batch; ``when`` orders writes across every RecordingSink."""
        self.closed = False

    async def write(self, batch: Batch) -> None:
        if self.config.per_batch_s:
            await trio.sleep(self.config.per_batch_s)
        seqs = batch.events["seq"].tolist()
        self.seqs += seqs
        self.writes.append((next(_WRITE_ORDER), seqs))

    async def aclose(self) -> None:
        self.closed = True


class ExplodesWhenBuilt(BatchStage):
    def __init__(self, config: Any, ctx: StageContext) -> None:
        raise RuntimeError("bad wiring")

    def process(self, batch: Batch) -> Batch:
        return batch


class FailsToStart(BatchStage):
    async def run(self, rx: Any, tx: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("device busy")

    def process(self, batch: Batch) -> Batch:
        return batch


class RecordingGate:
    """A sampling gate that remembers every rate it was set to."""

    def __init__(self) -> None:
        self.rates: list[int] = []

    def set_sample_rate(self, rate: int) -> None:
        self.rates.append(rate)


def check_exactly_once(
    pipe: Pipeline, sinks: Sequence[RecordingSink], filters: Sequence[SeqFilter] = ()
) -> list[int]:
    """Every seq the source sent ended exactly once (delivered or filtered), the sinks
    together wrote them in strictly increasing seq order (what one shared output, e.g.
    stdout, would show), and the ledger balances with the same counts. Returns the
    delivered seqs."""
    delivered = written(sinks)
    assert all(a < b for a, b in itertools.pairwise(delivered)), "per-source order broken"
    removed = [s for f in filters for s in f.removed]
    source = pipe.contexts[0].stats
    assert source.errors == 0, f"the source failed: {source.last_error}"
    ended = sorted(delivered + removed)
    assert ended == list(range(source.sent_events)), "an event was lost or duplicated"
    ledger = pipe.statistics().ledger
    assert ledger.pending == 0
    assert ledger.produced == ledger.accounted == source.produced_events
    assert ledger.total(Outcome.DELIVERED) == len(delivered)
    filtered = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "filtered")
    assert filtered == len(removed)
    unsent = sum(t.count for k, t in ledger.outcomes.items() if k.reason == "stopped before send")
    assert ledger.produced - source.sent_events == unsent
    return delivered


class StuckSink(BatchSink):
    """Takes one batch and never finishes writing it (an output that hangs)."""

    async def write(self, batch: Batch) -> None:
        await trio.sleep_forever()
