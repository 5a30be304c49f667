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

Switching the chain live (``replace_chain``)
--------------------------------------------
* The source is never restarted (its programs stay attached). The new nodes are
  built first (a constructor that raises changes nothing) and started sink-first
  behind it, with their own edges and contexts (same ledger, budget, settings,
  pressure, services); the new first stage is *held*: it receives nothing yet.
* The switch is a batch boundary: the source's sender is re-pointed at the new
  first edge between two sends (a batch that entered the old edge stays there; one
  the source holds while waiting for room on it goes to the new edge instead).
  At that instant the old first edge is closed, so end-of-stream flows down the
  old chain, which finishes what it holds as any chain does at a stop.
* Only when every old node has returned is the new first stage released: the old
  sink has written all it will write before the new one writes anything, so each
  source's order holds at the output. Meanwhile the new first edge buffers and
  the source meets back-pressure as usual: memory stays bounded, nothing is lost.
  An old chain that does not drain within ``shutdown.drain_timeout_s`` (a stuck
  sink, perhaps the one being replaced) is cancelled and its leftovers recorded
  as dropped (reason ``switch timeout``), as a stop past its deadline would.
  Then sampling gates are wired to the new chain's controllers (a gate left
  without one is set back to rate 1) and the old nodes' counters are folded into
  the new nodes of the same name, so per-stage totals never go backwards.
* ``nodes``/``contexts``/``edges``/``specs`` are the current chain (the new one
  from the switch on); ``statistics()`` adds a draining chain's counters in.
  ``stop()`` during a switch drains both chains in order; ``abort()`` and the
  final sweep cover every chain that ever ran, so the ledger still balances.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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

__all__ = ["ChainSwitch", "ChainSwitchError", "Helper", "NodeSpec", "Pipeline", "PipelineStatistics"]

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
            "stages": [s.summary() for s in self.stages],
            "edges": [
                {"name": e.name, "capacity": e.capacity, "depth": e.depth, "peak_depth": e.peak_depth}
                for e in self.edges
            ],
            "inflight": {"events": self.budget.events, "peak_events": self.budget.peak_events},
            "accounting": self.ledger.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class ChainSwitch:
    """What one :meth:`Pipeline.replace_chain` did. Times are seconds on trio's clock."""

    old: tuple[str, ...]
    """The nodes after the source before the switch."""
    new: tuple[str, ...]
    inflight_events: int
    """Events admitted and not yet given an outcome at the switch: all of them were in
    the old chain (its channels and stages), which then drained them."""
    switch_s: float
    """From the request to the batch boundary where the source moved (includes building
    and starting the new nodes, and a send in progress finishing on the old edge)."""
    drain_s: float
    """From the switch until the old chain's last node returned (the new chain's first
    stage starts receiving then)."""

    @property
    def total_s(self) -> float:
        return self.switch_s + self.drain_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "old": list(self.old),
            "new": list(self.new),
            "inflight_events": self.inflight_events,
            "switch_s": self.switch_s,
            "drain_s": self.drain_s,
            "total_s": self.total_s,
        }


class ChainSwitchError(BpfpipeError):
    """``replace_chain`` could not switch (the pipeline is not running, is stopping, or
    its source has ended); the running chain is unchanged."""


@dataclass(eq=False, slots=True)
class _Chain:
    """One generation of the graph. Every generation shares node 0, the source."""

    specs: tuple[NodeSpec, ...]
    contexts: list[StageContext]
    edges: list[Edge]
    nodes: list[Source | Stage | Sink]
    done: list[trio.Event]
    """Per node: set once it has returned and drained its input."""
    scopes: list[trio.CancelScope] = field(default_factory=list)
    """One around each node after the source: cancelled if the chain, replaced, does not
    drain within ``shutdown.drain_timeout_s``."""


@dataclass(eq=False, slots=True)
class _Handover:
    """Filled in as a switch proceeds (by the source's task, then the handover task)."""

    inflight_events: int = 0
    switched_at: float = 0.0
    drained_at: float | None = None
    switched: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)


_COUNTERS = (
    "received_batches",
    "received_events",
    "sent_batches",
    "sent_events",
    "dropped_events",
    "produced_events",
    "delivered_events",
    "errors",
)


def _add_counts(into: StageStatistics, other: StageStatistics) -> None:
    """Add ``other``'s counters to ``into`` (same stage name, an earlier chain)."""
    for name in _COUNTERS:
        setattr(into, name, getattr(into, name) + getattr(other, name))
    if not into.last_error:
        into.last_error = other.last_error


class _SinkReceiver(BatchReceiver):
    """The sink's receiving end: runs the pipeline's sink observers on each batch."""

    def __init__(
        self,
        edge: Edge,
        ctx: StageContext,
        observers: list[Callable[[Batch], Batch | None]],
        *,
        opens: trio.Event | None = None,
    ) -> None:
        super().__init__(edge, ctx, opens=opens)
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


def _check_chain(nodes: Sequence[NodeSpec], capacities: Sequence[int]) -> None:
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


def _edges(nodes: Sequence[NodeSpec], capacities: Sequence[int]) -> list[Edge]:
    return [Edge(f"{a.name}->{b.name}", cap) for a, b, cap in zip(nodes, nodes[1:], capacities, strict=False)]


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
        _check_chain(nodes, capacities)
        self.ledger = ledger if ledger is not None else Ledger()
        self.settings = settings if settings is not None else Config()
        limits = self.settings.limits
        self.budget = InflightBudget(limits.max_inflight_events, limits.max_inflight_bytes)
        self.pressure = Pressure()
        self.services = Services()
        self.helpers = tuple(helpers)
        contexts = [self._context(nodes, i) for i in range(len(nodes))]
        edges = _edges(nodes, capacities)
        built = [_construct(spec, ctx) for spec, ctx in zip(nodes, contexts, strict=True)]
        self._chain = _Chain(tuple(nodes), contexts, edges, built, [trio.Event() for _ in nodes])
        self._draining: _Chain | None = None
        """The chain a switch is draining (until its last node returns)."""
        self._retired: list[_Chain] = []
        """Every chain replaced so far (swept with the current one at the end)."""
        self._switch_lock = trio.Lock()
        self._last_switch: _Handover | None = None
        """The latest switch; the next one waits for its handover (even if the call that
        made it was cancelled: the move, once committed, still happens)."""
        self._source_tx: BatchSender | None = None
        self._node_nursery: trio.Nursery | None = None
        self.switches = 0
        """Completed ``replace_chain`` calls."""
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

    @property
    def specs(self) -> tuple[NodeSpec, ...]:
        """The current chain's specs, source first."""
        return self._chain.specs

    @property
    def nodes(self) -> list[Source | Stage | Sink]:
        """The current chain's nodes, source first (after a switch: the new chain)."""
        return self._chain.nodes

    @property
    def contexts(self) -> list[StageContext]:
        return self._chain.contexts

    @property
    def edges(self) -> list[Edge]:
        return self._chain.edges

    @property
    def source_done(self) -> trio.Event:
        """Set once the source's task has returned and closed its channel (a graph
        switch keeps the source, and this event with it)."""
        return self._chain.done[0]

    def _context(self, nodes: Sequence[NodeSpec], index: int) -> StageContext:
        spec = nodes[index]
        ctx = StageContext(
            spec.name,
            spec.factory.kind,
            self.ledger,
            self.budget,
            settings=self.settings,
            pressure=self.pressure,
            services=self.services,
            node=index,
            upstream=tuple(n.name for n in nodes[:index]),
        )
        ctx.request_stop = self.stop
        return ctx

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
        """The current chain's stages and edges. While a switch drains the old chain, a
        stage's counters include its namesake's there, and the old chain's other stages
        and edges are listed after the current ones."""
        stages = [copy.copy(c.stats) for c in self.contexts]
        edges = [e.statistics() for e in self.edges]
        draining = self._draining
        if draining is not None:
            by_name = {s.name: s for s in stages[1:]}
            for ctx in draining.contexts[1:]:
                current = by_name.get(ctx.name)
                if current is None:
                    stages.append(copy.copy(ctx.stats))
                else:
                    _add_counts(current, ctx.stats)
            names = {e.name for e in edges}
            edges += [e.statistics() for e in draining.edges if e.name not in names]
        return PipelineStatistics(
            stages=tuple(stages),
            edges=tuple(edges),
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
                        self._node_nursery = nursery
                        chain = self._chain
                        for index in reversed(range(len(chain.nodes))):
                            await nursery.start(self._run_node, chain, index, None)
                        self._wire(chain)
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

    def _wire(self, chain: _Chain, since: int = 0) -> set[int]:
        """Connect published sampling gates to the controllers of ``chain`` downstream of
        them: the source's, and those published by ``chain``'s own nodes (from entry
        ``since`` on; earlier ones came from a chain that is gone). Returns the ids of the
        gates some controller took."""
        taken: set[int] = set()
        for i, published in enumerate(self.services.sampling_gates):
            if published.node != 0 and i < since:
                continue
            gate = published.service
            assert isinstance(gate, SamplingGate)
            for node in chain.nodes[published.node + 1 :]:
                if isinstance(node, SamplingController):
                    node.attach_gate(gate)
                    taken.add(id(gate))
        return taken

    async def _run_node(
        self, chain: _Chain, index: int, opens: trio.Event | None, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            if index == 0:
                await self._run_node_ends(chain, index, opens, task_status)
            else:
                scope = trio.CancelScope()
                chain.scopes.append(scope)
                with scope:
                    await self._run_node_ends(chain, index, opens, task_status)
        finally:
            chain.done[index].set()

    async def _run_node_ends(
        self, chain: _Chain, index: int, opens: trio.Event | None, task_status: trio.TaskStatus[None]
    ) -> None:
        node = chain.nodes[index]
        ctx = chain.contexts[index]
        edges = chain.edges
        rx: BatchReceiver | None = None
        if index == len(chain.nodes) - 1:
            rx = _SinkReceiver(edges[index - 1], ctx, self.sink_observers, opens=opens)
        elif index > 0:
            rx = BatchReceiver(edges[index - 1], ctx, opens=opens)
        tx = BatchSender(edges[index], ctx, admits=index == 0) if index < len(edges) else None
        if index == 0:
            self._source_tx = tx
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

    # -- switching the chain -----------------------------------------------------------
    async def replace_chain(self, specs: Sequence[NodeSpec], capacities: Sequence[int]) -> ChainSwitch:
        """Replace everything after the source with ``specs`` (stages..., sink), the
        channel into each of them of the matching capacity, while the source runs on.

        Returns once the old chain has drained and the new one receives (see the module
        docstring for how). Raises what building a node raises (``StageLoadError``), or
        ``StageStartError`` if a new node fails to start — the running chain is then
        unchanged — and ``ChainSwitchError`` if the pipeline is not running, is stopping
        or its source has ended. Calls are serialized. Once the source has moved the
        switch is committed: cancelling this call stops the waiting, not the switch."""
        requested = trio.current_time()
        _check_chain([self.specs[0], *specs], capacities)
        async with self._switch_lock:
            previous = self._last_switch
            if previous is not None:
                await previous.switched.wait()
                await previous.finished.wait()
            nursery = self._node_nursery
            if not self.started or nursery is None or self.finished.is_set():
                raise ChainSwitchError("cannot replace the stage chain: the pipeline is not running")
            if self.stopping:
                raise ChainSwitchError("cannot replace the stage chain: the pipeline is stopping")
            if self._chain.done[0].is_set():
                raise ChainSwitchError("cannot replace the stage chain: the source has ended")
            old = self._chain
            full = (old.specs[0], *specs)
            contexts = [old.contexts[0], *(self._context(full, i) for i in range(1, len(full)))]
            edges = _edges(full, capacities)
            built = [_construct(spec, ctx) for spec, ctx in zip(specs, contexts[1:], strict=True)]
            chain = _Chain(full, contexts, edges, [old.nodes[0], *built], [old.done[0]])
            chain.done += [trio.Event() for _ in specs]
            opens = trio.Event()
            since = len(self.services.sampling_gates)
            try:
                for index in reversed(range(1, len(full))):
                    await nursery.start(self._run_node, chain, index, opens if index == 1 else None)
            except BaseException:
                self._discard(chain, opens)
                raise
            report = _Handover()
            tx = self._source_tx

            def at_batch_boundary(old_edge: Edge) -> None:
                # In the source's task, between two sends: nothing is on its way anywhere.
                # What the old chain holds: admitted events, less a batch the source
                # holds while waiting for room (it goes to the new chain).
                assert tx is not None
                report.inflight_events = self.budget.events - tx.holding_events
                report.switched_at = trio.current_time()
                self._chain = chain
                self._draining = old
                self._retired.append(old)
                old_edge.send_channel.close()  # end of stream for the old chain
                nursery.start_soon(self._hand_over, old, chain, opens, since, report)
                report.switched.set()

            if tx is None or not tx.redirect(edges[0], at_batch_boundary):
                self._discard(chain, opens)
                why = "the pipeline is stopping" if self.stopping else "the source has ended"
                raise ChainSwitchError(f"cannot replace the stage chain: {why}")
            self._last_switch = report
            log.info(
                "stage chain switching",
                extra={"stages": " -> ".join(s.name for s in full)},
            )
            await report.switched.wait()
            await report.finished.wait()
            if report.drained_at is None:
                raise ChainSwitchError(
                    "the pipeline was aborted during the stage chain switch "
                    "(what was in flight is recorded as dropped, reason shutdown)"
                )
            return ChainSwitch(
                old=tuple(s.name for s in old.specs[1:]),
                new=tuple(s.name for s in specs),
                inflight_events=report.inflight_events,
                switch_s=report.switched_at - requested,
                drain_s=report.drained_at - report.switched_at,
            )

    def _discard(self, chain: _Chain, opens: trio.Event) -> None:
        """End a new chain that never got the source: its started nodes see end of stream."""
        chain.edges[0].send_channel.close()
        opens.set()

    async def _hand_over(
        self, old: _Chain, new: _Chain, opens: trio.Event, since: int, report: _Handover
    ) -> None:
        """Once every node of ``old`` has returned, let ``new`` receive. An old chain that
        has not drained within ``shutdown.drain_timeout_s`` (a stuck sink: perhaps the very
        reason for the switch) is cancelled, and what it still holds is recorded as dropped
        (reason ``switch timeout``), as a stop past its deadline would."""
        try:
            timeout = self.settings.shutdown.drain_timeout_s
            with trio.move_on_after(timeout) as waiting:
                for done in old.done[1:]:
                    await done.wait()
            if waiting.cancelled_caught:
                log.warning(
                    "the replaced stage chain did not drain in time: cancelling it",
                    extra={"drain_timeout_s": timeout},
                )
                for scope in old.scopes:
                    scope.cancel()
                for done in old.done[1:]:
                    await done.wait()
                self._sweep_chain(old, "switch timeout")
            by_name = {ctx.name: ctx for ctx in new.contexts[1:]}
            for ctx in old.contexts[1:]:
                namesake = by_name.get(ctx.name)
                if namesake is not None:
                    _add_counts(namesake.stats, ctx.stats)
            self._draining = None
            self._release_gates(old, new, since)
            opens.set()
            self.switches += 1
            report.drained_at = trio.current_time()
            log.info(
                "stage chain switched",
                extra={
                    "stages": " -> ".join(s.name for s in new.specs),
                    "inflight_events": report.inflight_events,
                    "drain_s": round(report.drained_at - report.switched_at, 6),
                },
            )
        finally:
            report.finished.set()

    def _release_gates(self, old: _Chain, new: _Chain, since: int) -> None:
        """Wire the gates to ``new``; a source's gate that the old chain controlled and the
        new one does not goes back to rate 1 (the kernel emits everything), so no sampler
        that has ended keeps holding it down."""
        taken = self._wire(new, since)
        controlled = any(isinstance(node, SamplingController) for node in old.nodes[1:])
        if not controlled:
            return
        for published in self.services.sampling_gates:
            gate = published.service
            assert isinstance(gate, SamplingGate)
            if published.node == 0 and id(gate) not in taken:
                try:
                    gate.set_sample_rate(1)
                except Exception as exc:
                    old.contexts[0].error(exc, "set_sample_rate(1) after the switch")

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
        """After an abort: account for batches left in channels or in stages' hands, in
        every chain that ran (a switch's old chain too)."""
        for chain in [*self._retired, self._chain]:
            self._sweep_chain(chain, "shutdown")
        self._settle(self._chain.contexts[0], "shutdown")

    def _sweep_chain(self, chain: _Chain, reason: str) -> None:
        """Record as dropped what ``chain``'s channels and nodes (after the source) still hold."""
        for index, edge in enumerate(chain.edges):
            consumer = chain.contexts[index + 1]
            rx = BatchReceiver(edge, consumer)
            while True:
                try:
                    batch = rx.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                consumer.drop_batch(batch, reason=reason)
        for ctx in chain.contexts[1:]:
            self._settle(ctx, reason)
