"""Measuring sinks for bench/efficiency.py: the null and JSON-lines sinks, plus a record
of when each batch was written (loaded as ``[sink] use = "_efficiency_sink:..."`` with
``bench/`` on PYTHONPATH).

Per batch (never per event) they keep the kernel timestamps of its events, the time
``write`` returned and the batch's ``read_time_ns`` (one per ring read). At end of
stream they save these and the ledger's loss totals to ``$BPFPIPE_EFFICIENCY_OUT``
(``.npz``); the benchmark computes latency and wake-ups from them. The JSON-lines
sink also saves whether its file was still written inline at the end (``1``/``0``;
``-1``: no output, or the null sink), which costs ~10 % more CPU at 1 k events/s when not.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline import Batch, Outcome
from stages.jsonl_sink import JsonLinesSink
from stages.null_sink import NullSink


class _Recorder:
    def __init__(self) -> None:
        self.ts: list[np.ndarray] = []
        self.written_ns: list[int] = []
        self.read_ns: list[int] = []

    def add(self, batch: Batch) -> None:
        self.ts.append(np.array(batch.events["ts_ns"], dtype=np.int64))
        self.written_ns.append(time.monotonic_ns())
        self.read_ns.append(batch.read_time_ns)

    def save(self, ledger_snapshot: object, *, output_inline: bool | None = None) -> None:
        path = os.environ.get("BPFPIPE_EFFICIENCY_OUT")
        if not path:
            return
        snap = ledger_snapshot
        np.savez(
            path,
            counts=np.array([len(t) for t in self.ts], dtype=np.int64),
            ts_ns=np.concatenate(self.ts) if self.ts else np.zeros(0, np.int64),
            written_ns=np.array(self.written_ns, dtype=np.int64),
            read_ns=np.array(self.read_ns, dtype=np.int64),
            lost_reserve=snap.total(Outcome.LOST_ON_RESERVE),  # type: ignore[attr-defined]
            drained=snap.total(Outcome.DRAINED),  # type: ignore[attr-defined]
            output_inline=-1 if output_inline is None else int(output_inline),
        )


class MeasuringNullSink(NullSink):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._record = _Recorder()

    async def write(self, batch: Batch) -> None:
        self._record.add(batch)

    async def aclose(self) -> None:
        self._record.save(self.ctx.ledger.snapshot())


class MeasuringJsonlSink(JsonLinesSink):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._record = _Recorder()

    async def write(self, batch: Batch) -> None:
        await super().write(batch)
        self._record.add(batch)

    async def aclose(self) -> None:
        out = self._out
        await super().aclose()
        self._record.save(self.ctx.ledger.snapshot(), output_inline=None if out is None else out.inline)
