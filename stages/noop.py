"""The smallest possible stage: passes every batch on unchanged (benchmarks, tests)."""

from __future__ import annotations

from pipeline import Batch, BatchStage


class NoopStage(BatchStage):
    def process(self, batch: Batch) -> Batch:
        return batch
