"""A sink that discards (and counts as delivered) everything: for benchmarks."""

from __future__ import annotations

from pipeline import Batch, BatchSink


class NullSink(BatchSink):
    async def write(self, batch: Batch) -> None:
        return None
