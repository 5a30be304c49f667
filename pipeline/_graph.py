"""The graph runtime: a chain source → stages → sink joined by bounded edges.

Theory of operation
-------------------
* Nodes start sink-first with ``nursery.start`` so every consumer is ready
  before its producer sends; ``Pipeline.run`` reports started when the source is.
* A node's sending end is closed when the node returns (normally, by error, or
  by cancellation), so end-of-stream flows downstream in order.
* ``stop()`` cancels only the source: everything already admitted drains through
  the stages and reaches the sink — a graceful shutdown loses nothing.
  ``abort()`` cancels everything; whatever is still queued or held is then
  recorded as dropped with reason ``shutdown``, so the ledger still balances.
  A graceful stop has a deadline, ``shutdown.drain_timeout_s``: past it the
  pipeline aborts (and says so in ``drain_timed_out``), so a stuck sink cannot
  hold the process forever.
* A stage that raises is logged with its name and counted; the runtime then
  keeps draining its input (recording drops, reason ``stage failed``) so
  upstream never blocks on a dead consumer. It never kills the process.
* Once every node has started, published services are wired by type (see
  ``pipeline._services``): each sampling gate to the sampling controllers
  downstream of its publisher. Then the *helpers* start: background tasks the
  caller composed in (the resource enforcer, later servers), each
  ``async def helper(pipeline, *, task_status)``. A graph built directly from
  specs runs with none of them and touches nothing outside itself.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._batch import Batch
from ._channel import BatchReceiver, BatchSender, BudgetStatistics, Edge, EdgeStatistics, InflightBudget
from ._services import SamplingController, SamplingGate, Services
from ._stage import Sink, Source, Stage, StageContext, StageStatistics
from .accounting import Ledger, LedgerSnapshot, Outcome
from .config import Config
from .errors import BpfpipeError, StageLoadError, StageStartError
from .limits import Pressure

__all__ = ["Helper", "NodeSpec", "Pipeline", "PipelineStatistics"]

log = logging.getLogger("bpfpipe.pipeline")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One element of the chain: a name, the class to build and its decoded config."""

    name: str
    factory: type[Source] | type[Stage] | type[Sink]
    config: Any = None

    def build(self, ctx: StageContext) -> Source | Stage | Sink:
        config = self.config if self.config is not None else self.factory.Config()
        return self.factory(config, ctx)


@dataclass(frozen=True, slots=True)
class PipelineStatistics:
    stages: tuple[StageStatistics, ...]
    edges: tuple[EdgeStatistics, ...]
    budget: BudgetStatistics
    ledger: LedgerSnapshot

    def stage(self, name: str) -> StageStatistics:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "received_events": s.received_events,
                    "sent_events": s.sent_events,
                    "dropped_events": s.dropped_events,
                    "delivered_events": s.delivered_events,
                    "errors": s.errors,
                }
                for s in self.stages
            ],
            "edges": [
                {"name": e.name, "capacity": e.capacity, "depth": e.depth, "peak_depth": e.peak_depth}
                for e in self.edges
            ],
            "inflight": {"events": self.budget.events, "peak_events": self.budget.peak_events},
            "accounting": self.ledger.as_dict(),
        }


class _SinkReceiver(BatchReceiver):
    """The sink's receiving end: runs the pipeline's sink observers on each batch."""

    def __init__(
        self, edge: Edge, ctx: StageContext, observers: list[Callable[[Batch], Batch | None]]
    ) -> None:
        super().__init__(edge, ctx)
        self._observers = observers

    async def receive(self) -> Batch:
        while True:
            passed = self._observe(await super().receive())
            if passed is not None:
                return passed

    def receive_nowait(self) -> Batch:
        while True:
            passed = self._observe(super().receive_nowait())
            if passed is not None:
                return passed

    def _observe(self, batch: Batch) -> Batch | None:
        for observe in self._observers:
            out = observe(batch)
            if out is None:
                return None
            batch = out
        return batch


def _first_start_error(group: BaseExceptionGroup[BaseException]) -> StageStartError | None:
    """A stage that failed to start is the whole story: surface it, not the nesting."""
    for exc in group.exceptions:
        if isinstance(exc, StageStartError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_start_error(exc)
            if found is not None:
                return found
    return None


def _construct(spec: NodeSpec, ctx: StageContext) -> Source | Stage | Sink:
    """Build one node; a constructor that raises is a config error naming the stage."""
    try:
        return spec.build(ctx)
    except BpfpipeError:
        raise
    except Exception as exc:
        raise StageLoadError(spec.name, f"constructing it raised {type(exc).__name__}: {exc}") from exc


Helper = Callable[..., Awaitable[None]]
"""A background task run beside the nodes: ``async def helper(pipeline, *, task_status)``;
it calls ``task_status.started()`` once running and is cancelled when the graph ends."""


class _StartedFlag(trio.TaskStatus[None]):
    """Wraps a TaskStatus to remember whether the node said it was ready."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self.is_started = False

    def started(self, value: None = None) -> None:
        self.is_started = True
        self._inner.started(value)


class Pipeline:
    """A running (or runnable) chain of nodes. Build with :func:`pipeline.build_pipeline`
    from config, or directly from :class:`NodeSpec` objects in tests."""

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        capacities: Sequence[int],
        *,
        settings: Config | None = None,
        ledger: Ledger | None = None,
        helpers: Sequence[Helper] = (),
    ) -> None:
        if len(nodes) < 2:
            raise ValueError("a pipeline needs at least a source and a sink")
        if len(capacities) != len(nodes) - 1:
            raise ValueError(f"{len(nodes)} nodes need {len(nodes) - 1} edge capacities")
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        kinds = [n.factory.kind for n in nodes]
        if kinds[0] != "source" or kinds[-1] != "sink" or any(k != "stage" for k in kinds[1:-1]):
            raise ValueError(f"expected source, stages..., sink; got {kinds}")
        self.ledger = ledger if ledger is not None else Ledger()
        self.settings = settings if settings is not None else Config()
        limits = self.settings.limits
        self.budget = InflightBudget(limits.max_inflight_events, limits.max_inflight_bytes)
        self.specs = tuple(nodes)
        self.pressure = Pressure()
        self.services = Services()
        self.helpers = tuple(helpers)
        self.contexts = [
            StageContext(
                n.name,
                n.factory.kind,
                self.ledger,
                self.budget,
                settings=self.settings,
                pressure=self.pressure,
                services=self.services,
                node=i,
                upstream=tuple(names[:i]),
            )
            for i, n in enumerate(nodes)
        ]
        for ctx in self.contexts:
            ctx.request_stop = self.stop
        self.edges = [
            Edge(f"{a.name}->{b.name}", cap) for a, b, cap in zip(nodes, nodes[1:], capacities, strict=False)
        ]
        self.nodes = [_construct(spec, ctx) for spec, ctx in zip(nodes, self.contexts, strict=True)]
        self._source_scope = trio.CancelScope()
        self._nursery_scope: trio.CancelScope | None = None
        self._stop_requested = trio.Event()
        self.drain_timed_out = False
        self.failure: str | None = None
        """Why the run stopped unable to do its job (set through ``stop(failure=...)``)."""
        """The graceful stop missed ``shutdown.drain_timeout_s`` and was turned into an abort."""
        self.finished = trio.Event()
        self.started = False
        """Every node and helper has started (``run`` reported started)."""
        self.sink_observers: list[Callable[[Batch], Batch | None]] = []
        """Called, in order, with every batch the sink is about to receive; each returns
        the batch to pass on or None if it consumed it (then it must have recorded the
        batch's outcome, e.g. with ``contexts[-1].record``). Per batch, never per event:
        end-to-end latency and heartbeat interception hook in here."""

    # -- control --------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """``stop()`` (or ``abort()``) has been called."""
        return self._source_scope.cancel_called

    def stop(self, *, failure: str | None = None) -> None:
        """Graceful: stop the source; everything admitted drains to the sink (within
        ``shutdown.drain_timeout_s``, else the pipeline aborts). ``failure`` says why the
        run cannot go on (e.g. its output is gone); the first one is kept in ``failure``."""
        if failure is not None and self.failure is None:
            self.failure = failure
        self._source_scope.cancel()
        self._stop_requested.set()

    def abort(self) -> None:
        """Immediate: cancel every node; leftovers are recorded as dropped (``shutdown``)."""
        self._source_scope.cancel()
        if self._nursery_scope is not None:
            self._nursery_scope.cancel()

    def statistics(self) -> PipelineStatistics:
        return PipelineStatistics(
            stages=tuple(copy.copy(c.stats) for c in self.contexts),
            edges=tuple(e.statistics() for e in self.edges),
            budget=self.budget.statistics(),
            ledger=self.ledger.snapshot(),
        )

    # -- running ---------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the source ends (or ``stop()``) and everything has drained."""
        try:
            async with trio.open_nursery() as helpers:
                helpers.start_soon(self._abort_past_drain_deadline)
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery_scope = nursery.cancel_scope
                        for index in reversed(range(len(self.nodes))):
                            await nursery.start(self._run_node, index)
                        self._wire()
                        for helper in self.helpers:
                            await helpers.start(helper, self)
                        log.info(
                            "pipeline started",
                            extra={"stages": " -> ".join(s.name for s in self.specs)},
                        )
                        self.started = True
                        task_status.started()
                finally:
                    helpers.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            start_error = _first_start_error(group)
            if start_error is None:
                raise
            raise start_error from None
        finally:
            self._sweep()
            self.finished.set()

    async def _abort_past_drain_deadline(self) -> None:
        await self._stop_requested.wait()
        timeout = self.settings.shutdown.drain_timeout_s
        await trio.sleep(timeout)
        log.warning("drain deadline passed: aborting", extra={"drain_timeout_s": timeout})
        self.drain_timed_out = True
        self.abort()

    def _wire(self) -> None:
        """Connect published sampling gates to the controllers downstream of them."""
        for published in self.services.sampling_gates:
            gate = published.service
            assert isinstance(gate, SamplingGate)
            for node in self.nodes[published.node + 1 :]:
                if isinstance(node, SamplingController):
                    node.attach_gate(gate)

    async def _run_node(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        node = self.nodes[index]
        ctx = self.contexts[index]
        rx: BatchReceiver | None = None
        if index == len(self.nodes) - 1:
            rx = _SinkReceiver(self.edges[index - 1], ctx, self.sink_observers)
        elif index > 0:
            rx = BatchReceiver(self.edges[index - 1], ctx)
        tx = BatchSender(self.edges[index], ctx, admits=index == 0) if index < len(self.edges) else None
        status = _StartedFlag(task_status)
        failed = False
        try:
            if isinstance(node, Source):
                assert tx is not None
                with self._source_scope:
                    await node.run(tx, task_status=status)
            elif isinstance(node, Stage):
                assert rx is not None and tx is not None
                await node.run(rx, tx, task_status=status)
            else:
                assert rx is not None
                await node.run(rx, task_status=status)
        except Exception as exc:
            if not status.is_started:
                if isinstance(exc, BpfpipeError):  # already written for people
                    raise StageStartError(ctx.name, str(exc), exc.exit_code) from exc
                raise StageStartError(ctx.name, f"{type(exc).__name__}: {exc}") from exc
            failed = True
            ctx.error(exc, "run()")
        else:
            if not status.is_started:  # returned at once, e.g. an empty source
                status.started()
        finally:
            if tx is not None:
                tx.close()
        # Settle what the node still holds *before* draining its input: that releases
        # its in-flight budget, and the source may be waiting for exactly that room
        # before it can send on and, eventually, end the stream the drain waits for.
        self._settle(ctx, "stage failed" if failed else "unreported")
        if rx is not None:
            await self._drain_input(rx, ctx, "stage failed" if failed else "unconsumed")

    @staticmethod
    async def _drain_input(rx: BatchReceiver, ctx: StageContext, reason: str) -> None:
        """Consume what upstream still sends to a node that stopped reading."""
        try:
            async for batch in rx:
                ctx.drop_batch(batch, reason=reason)
        except trio.ClosedResourceError:
            pass

    @staticmethod
    def _settle(ctx: StageContext, reason: str) -> None:
        held = ctx.stats.held_events
        if held <= 0:
            return
        if ctx.stats.kind == "source":
            # Produced but never sent (stopped mid-send): never admitted to the budget.
            ctx.ledger.record(Outcome.STAGE_DROPPED, held, stage=ctx.name, reason="stopped before send")
            ctx.stats.dropped_events += held
        else:
            ctx.drop(held, reason=reason)

    def _sweep(self) -> None:
        """After an abort: account for batches left in channels or in stages' hands."""
        for index, edge in enumerate(self.edges):
            consumer = self.contexts[index + 1]
            rx = BatchReceiver(edge, consumer)
            while True:
                try:
                    batch = rx.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                consumer.drop_batch(batch, reason="shutdown")
        for ctx in self.contexts:
            self._settle(ctx, "shutdown")
