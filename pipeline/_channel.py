"""Bounded batch channels between stages, and the global in-flight budget.

Every edge of the graph is a trio memory channel of a fixed capacity (in
batches), wrapped so the runtime can see depth, peak depth and the events and
bytes queued on it without asking stages to cooperate.

The :class:`InflightBudget` bounds the events (and bytes) inside the user-space
pipeline as a whole: a source *admits* a batch before sending it, and every
outcome recorded for an admitted event *releases* it. Sources wait for room (or,
with a draining policy, drop at the origin and say so); nothing downstream ever
blocks on the budget, so it cannot deadlock.

A :class:`BatchSender` can be re-pointed at another edge (:meth:`BatchSender.redirect`)
only at a batch boundary: a batch that has entered a channel is counted there and its
``send`` completes there; a batch still waiting for room (``send`` on a full edge, or
``wait_room``) has entered none, and goes wherever the sender points once there is
room. That is how a running source is moved onto a new chain of stages without
waiting for the old one to make room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import trio

from ._batch import Batch

if TYPE_CHECKING:
    from ._stage import StageContext

__all__ = ["BatchReceiver", "BatchSender", "Edge", "EdgeStatistics", "InflightBudget"]


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    events: int
    bytes: int
    max_events: int
    max_bytes: int
    peak_events: int
    peak_bytes: int
    waits: int


class InflightBudget:
    """Events and bytes admitted into the pipeline and not yet given an outcome.

    ``max_events``/``max_bytes`` of 0 mean unbounded. A batch larger than the
    whole budget is admitted when nothing else is in flight, so progress is
    always possible.
    """

    def __init__(self, max_events: int = 0, max_bytes: int = 0) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.events = 0
        self.bytes = 0
        self.peak_events = 0
        self.peak_bytes = 0
        self.waits = 0
        self._lot = trio.lowlevel.ParkingLot()

    def has_room(self, events: int, nbytes: int) -> bool:
        if self.events == 0:
            return True
        if self.max_events and self.events + events > self.max_events:
            return False
        return not (self.max_bytes and self.bytes + nbytes > self.max_bytes)

    async def wait_room(self, events: int, nbytes: int) -> None:
        """Wait until a batch of this size fits (without admitting it)."""
        if not self.has_room(events, nbytes):
            self.waits += 1
            while not self.has_room(events, nbytes):
                await self._lot.park()

    async def admit(self, events: int, nbytes: int) -> None:
        """Wait until the batch fits, then count it as in flight."""
        if not self.has_room(events, nbytes):
            self.waits += 1
            while not self.has_room(events, nbytes):
                await self._lot.park()
        self.admit_nowait(events, nbytes)

    def admit_nowait(self, events: int, nbytes: int) -> None:
        self.events += events
        self.bytes += nbytes
        if self.events > self.peak_events:
            self.peak_events = self.events
        if self.bytes > self.peak_bytes:
            self.peak_bytes = self.bytes

    def release(self, events: int) -> None:
        """Events got their outcome. Bytes are released in proportion, since stages
        may change a batch's representation (decoding) on the way."""
        if events > self.events:
            raise AssertionError(f"releasing {events} events but only {self.events} in flight")
        if events == self.events:
            self.bytes = 0
        else:
            self.bytes -= self.bytes * events // self.events
        self.events -= events
        if self._lot:  # unpark_all() on an empty lot still builds a list: per batch, so skip it
            self._lot.unpark_all()

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            self.events,
            self.bytes,
            self.max_events,
            self.max_bytes,
            self.peak_events,
            self.peak_bytes,
            self.waits,
        )


@dataclass(frozen=True, slots=True)
class EdgeStatistics:
    """One channel, seen from both ends. Counters are cumulative since start.

    The producer's side: ``sent_*`` counts what ``send`` completed. The consumer's
    side: ``received_*`` counts what the consumer took off the channel, so over a
    period ``Δreceived_events`` is the consumer's rate, and while the consumer is
    the bottleneck that rate is its capacity (what the sampler learns). Queued
    counts include a batch whose ``send`` is still waiting for room.

    ``completed_events`` and ``last_take_s`` measure that rate without counting a
    partial batch: a consumer that takes batch ``k + 1`` has finished batch ``k``, so
    between two takes it finished exactly the events received before the later one.
    While it is busy throughout (the bottleneck: there is always a batch to take),
    ``Δcompleted_events / Δlast_take_s`` is its rate to within the clock's error,
    where ``Δreceived_events`` over a fixed period is off by up to a batch.
    """

    name: str
    capacity: int
    depth: int
    """Batches buffered now."""
    peak_depth: int
    queued_events: int
    """Events handed to ``send`` and not yet received (incl. a send that is waiting)."""
    queued_bytes: int
    sent_batches: int
    sent_events: int
    received_batches: int
    received_events: int
    completed_events: int = 0
    """Events received before the last take (``received_events`` less the last batch)."""
    last_take_s: float = 0.0
    """When the consumer took its last batch, on trio's clock (0: never)."""
    full_waits: int = 0
    """Times a producer found the channel full and waited for the consumer to take a batch
    (``send`` or ``wait_room``; a wait for the in-flight budget alone does not count): each
    is a moment the consumer, not the producer, set the pace."""

    @property
    def fill(self) -> float:
        """Occupancy as a fraction of capacity."""
        return self.depth / self.capacity


class Edge:
    """One bounded channel from a producer stage to a consumer stage."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.send_channel, self.receive_channel = trio.open_memory_channel[Batch](capacity)
        self.peak_depth = 0
        self.queued_events = 0
        self.queued_bytes = 0
        self.sent_batches = 0
        self.sent_events = 0
        self.received_batches = 0
        self.received_events = 0
        self.completed_events = 0
        self.last_take_s = 0.0
        self.full_waits = 0
        self.sending = 0
        """Sends inside the trio channel's ``send`` (their batch may be buffered, uncounted)."""
        self.room = trio.lowlevel.ParkingLot()
        """Unparked whenever the consumer takes a batch."""

    @property
    def depth_bound(self) -> int:
        """An upper bound on :attr:`depth` from our own counters, without asking trio
        (``statistics()`` builds a record: about a microsecond, per batch and hop). A
        buffered batch was either counted as sent and not yet as received, or belongs
        to a send still in progress; so the depth is never more than this."""
        return self.sent_batches - self.received_batches + self.sending

    @property
    def depth(self) -> int:
        if self.depth_bound <= 0:
            return 0
        return self.send_channel.statistics().current_buffer_used

    @property
    def fill(self) -> float:
        """Occupancy as a fraction of capacity (what the sampler watches)."""
        return self.depth / self.capacity

    def statistics(self) -> EdgeStatistics:
        return EdgeStatistics(
            self.name,
            self.capacity,
            self.depth,
            self.peak_depth,
            self.queued_events,
            self.queued_bytes,
            self.sent_batches,
            self.sent_events,
            self.received_batches,
            self.received_events,
            self.completed_events,
            self.last_take_s,
            self.full_waits,
        )


class BatchSender:
    """The sending end a stage writes batches to. ``await tx.send(batch)``."""

    def __init__(self, edge: Edge, ctx: StageContext, *, admits: bool) -> None:
        self._edge = edge
        self._ctx = ctx
        self._admits = admits
        self._in_send = False
        """Inside the channel's ``send``: a batch is on its way into ``_edge``."""
        self._closed = False
        self._next_edge: Edge | None = None

    @property
    def fill(self) -> float:
        """Occupancy of the channel as a fraction of its capacity (cheap: read per batch)."""
        return self._edge.fill

    def statistics(self) -> EdgeStatistics:
        """Both ends' counters of this channel (see :class:`EdgeStatistics`)."""
        return self._edge.statistics()

    def has_room(self, batch: Batch) -> bool:
        """Whether :meth:`send` would take ``batch`` without waiting: the channel is
        surely not full and the memory budget admits it (False may be wrong, never True)."""
        edge = self._edge
        if edge.depth_bound >= edge.capacity:
            return False
        return not self._admits or self._ctx.budget.has_room(len(batch), batch.nbytes)

    async def send(self, batch: Batch) -> None:
        n = len(batch)
        if n == 0:
            return
        ctx = self._ctx
        nbytes = batch.nbytes
        if self._admits:
            await ctx.budget.admit(n, nbytes)
        edge = self._edge
        edge.queued_events += n
        edge.queued_bytes += nbytes
        try:
            if edge.depth_bound >= edge.capacity:  # perhaps full: wait where a redirect can move us
                edge = await self._room_for(edge, n, nbytes)
            edge.sending += 1
            self._in_send = True
            try:
                await edge.send_channel.send(batch)  # there is room: done at once, then a checkpoint
            finally:
                edge.sending -= 1
                self._in_send = False
        except BaseException:
            edge.queued_events -= n
            edge.queued_bytes -= nbytes
            if self._admits:
                ctx.budget.release(n)
            if self._next_edge is not None:
                self._move()
            raise
        self._sent(edge, n)
        if self._next_edge is not None:
            self._move()
        if ctx.taps:
            for tap in ctx.taps:
                tap(batch)

    async def _room_for(self, edge: Edge, n: int, nbytes: int) -> Edge:
        """Wait until ``edge`` (or the edge a redirect moved us to, where the batch then
        goes instead: it had not entered the old one) has room; returns that edge. The
        batch is counted as queued on the edge it waits for, and held meanwhile."""
        self.holding_events = n
        waited_on = edge
        try:
            while True:
                if edge is not self._edge:
                    edge.queued_events -= n
                    edge.queued_bytes -= nbytes
                    edge = self._edge
                    edge.queued_events += n
                    edge.queued_bytes += nbytes
                if edge.depth < edge.capacity:
                    return edge
                stats = edge.send_channel.statistics()
                if stats.tasks_waiting_receive or not stats.open_receive_channels:
                    return edge  # a receiver takes it at once, or trio's send raises
                edge.full_waits += 1
                await edge.room.park()
        except BaseException:
            if edge is not waited_on:  # the caller un-counts it where it started waiting
                edge.queued_events -= n
                edge.queued_bytes -= nbytes
                waited_on.queued_events += n
                waited_on.queued_bytes += nbytes
            raise
        finally:
            self.holding_events = 0

    holding_events = 0
    """Events of a batch ``send`` holds while it waits for room (admitted, in no channel)."""

    def send_would_block(self) -> bool:
        return self._edge.depth >= self._edge.capacity

    async def wait_room(self, events: int, nbytes: int) -> bool:
        """Wait until a batch of ``events`` events and ``nbytes`` bytes can be sent with
        :meth:`send_nowait` (room in the channel and, for a source, in the in-flight budget).
        Returns whether it had to wait (back-pressure held the caller); it returns at once,
        with no checkpoint, when there is room.

        A source that makes its batches on demand waits here *before* making and counting
        one, then sends it with ``send_nowait`` with no checkpoint in between: a stop that
        cancels the wait leaves no batch produced and unsent."""
        waited = False
        while True:
            if self._admits and not self._ctx.budget.has_room(events, nbytes):
                waited = True
                await self._ctx.budget.wait_room(events, nbytes)
            edge = self._edge  # read afresh: :meth:`redirect` may have moved us while we waited
            if edge.depth < edge.capacity or edge.send_channel.statistics().tasks_waiting_receive:
                if not self._admits or self._ctx.budget.has_room(events, nbytes):
                    return waited
                continue
            waited = True
            edge.full_waits += 1
            await edge.room.park()

    def send_nowait(self, batch: Batch) -> None:
        """Send without waiting; raises ``trio.WouldBlock`` (and sends nothing) if the
        channel is full or, for a source, the batch does not fit the in-flight budget."""
        n = len(batch)
        if n == 0:
            return
        edge = self._edge
        ctx = self._ctx
        nbytes = batch.nbytes
        if self._admits and not ctx.budget.has_room(n, nbytes):
            raise trio.WouldBlock
        edge.send_channel.send_nowait(batch)  # raises WouldBlock before anything is counted
        if self._admits:
            ctx.budget.admit_nowait(n, nbytes)
        edge.queued_events += n
        edge.queued_bytes += nbytes
        self._sent(edge, n)
        if ctx.taps:
            for tap in ctx.taps:
                tap(batch)

    def _sent(self, edge: Edge, n: int) -> None:
        """Count a completed send of ``n`` events on ``edge``."""
        edge.sent_batches += 1
        edge.sent_events += n
        if edge.depth_bound > edge.peak_depth:  # else the depth cannot be a new peak
            depth = edge.send_channel.statistics().current_buffer_used
            if depth > edge.peak_depth:
                edge.peak_depth = depth
        stats = self._ctx.stats
        stats.sent_batches += 1
        stats.sent_events += n

    def redirect(self, edge: Edge, then: Callable[[Edge], None]) -> bool:
        """Send on ``edge`` from now on, switching at a batch boundary: at once unless a
        batch is entering the old edge (the instant of trio's ``send`` after room was
        found), else right after that — the batch stays on the old edge, whose consumer is
        still reading. A ``send`` or ``wait_room`` waiting for room on the old edge has put
        nothing there: it wakes and waits for room on ``edge``. ``then(old_edge)`` is called
        right after the move, in the task that made it (it typically closes the old edge,
        which ends that consumer's stream).

        Returns False (and changes nothing) if this sender is already closed. Once it
        returns True the move is committed: it happens even if nobody waits for it."""
        if self._closed or self._next_edge is not None:
            return False
        self._next_edge, self._then = edge, then
        if not self._in_send:
            self._move()
        return True

    _then: Callable[[Edge], None] | None = None

    def _move(self) -> None:
        old, new, then = self._edge, self._next_edge, self._then
        assert new is not None and then is not None
        self._edge = new
        self._next_edge = self._then = None
        if old.room:
            old.room.unpark_all()
        then(old)

    async def aclose(self) -> None:
        self._closed = True
        await self._edge.send_channel.aclose()

    def close(self) -> None:
        self._closed = True
        self._edge.send_channel.close()


class BatchReceiver:
    """The receiving end a stage reads batches from: ``async for batch in rx``.

    With ``opens``, nothing is received before that event is set (the edge buffers
    meanwhile, so its sender meets back-pressure): the runtime holds a new chain's
    first stage this way until the chain it replaces has finished."""

    def __init__(self, edge: Edge, ctx: StageContext, *, opens: trio.Event | None = None) -> None:
        self._edge = edge
        self._ctx = ctx
        self._opens = opens

    def statistics(self) -> EdgeStatistics:
        """Both ends' counters of this channel (see :class:`EdgeStatistics`)."""
        return self._edge.statistics()

    async def receive(self) -> Batch:
        if self._opens is not None:
            await self._opens.wait()
            self._opens = None
        batch = await self._edge.receive_channel.receive()
        self._took(batch)
        return batch

    def receive_nowait(self) -> Batch:
        if self._opens is not None:
            if not self._opens.is_set():
                raise trio.WouldBlock
            self._opens = None
        batch = self._edge.receive_channel.receive_nowait()
        self._took(batch)
        return batch

    def _took(self, batch: Batch) -> None:
        n = len(batch)
        edge = self._edge
        edge.queued_events -= n
        edge.queued_bytes -= batch.nbytes
        edge.completed_events = edge.received_events
        try:  # noqa: SIM105 (per batch: a with-block costs more than a try)
            edge.last_take_s = trio.current_time()
        except RuntimeError:  # taken outside a trio run (a synchronous tool): no time to note
            pass
        edge.received_batches += 1
        edge.received_events += n
        if edge.room:
            edge.room.unpark_all()
        stats = self._ctx.stats
        stats.received_batches += 1
        stats.received_events += n

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._edge.receive_channel.close()
