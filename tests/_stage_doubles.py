"""Stage doubles for the heartbeat tests (with fakes in ``tests/unit``, on the kernel in
``tests/integration``): a plug-in stage that records what ``process`` is given, and a
stage that can hold every batch, to stall the chain on purpose.

Both keep their state on the class (the runtime builds the instance), so a test resets
it before building its pipeline.
"""

from __future__ import annotations

import trio

from pipeline import Batch, BatchReceiver, BatchSender, BatchStage, Stage


class RecordsEventNames(BatchStage):
    """A plug-in stage: records the event name of each batch ``process`` is given
    (never a heartbeat: the runtime sends those on untouched)."""

    seen: list[str] = []

    def process(self, batch: Batch) -> Batch | None:
        type(self).seen.append(batch.event_name)
        return batch


class Stall(Stage):
    """Forwards every batch, each once ``released`` is set: set at start; replace it with
    a new ``trio.Event()`` to stall the chain, and set that to let it go."""

    released: trio.Event

    async def run(
        self,
        rx: BatchReceiver,
        tx: BatchSender,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        type(self).released = trio.Event()
        type(self).released.set()
        task_status.started()
        async for batch in rx:
            await type(self).released.wait()
            await tx.send(batch)
