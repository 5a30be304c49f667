"""CircuitBreaker: keep a failing stage from taking the pipeline (or its events) down.

Wraps a *primary* — a per-batch stage (:class:`CircuitBreakerStage`) or a batch
sink such as an exporter (:class:`CircuitBreakerSink`) — and a *fallback*, by
default a :class:`~stages.spool_sink.SpoolSink`. The decisions are the pure
:class:`pipeline.breaker.CircuitBreaker` state machine's (closed → open after
``failure_threshold`` consecutive failures, one trial batch after
``reset_timeout_s``); this shell asks it where each batch goes and reports back.

What counts as a failure, and what happens to the batch:

* the primary raises: logged with the stage's name and counted; the batch goes to
  the fallback (``Outcome.FALLBACK``, reason ``primary failed``) — never lost, and
  the pipeline keeps running;
* an *async* primary (a sink's ``write``, or an ``async def process``) runs under
  ``trio.move_on_after(stage_timeout_s)``; if cancelled, the batch goes to the
  fallback (reason ``primary timed out``). What the primary did before the
  deadline is not undone, so an exporter may see that batch twice (at least once);
* a *sync* ``process()`` cannot be interrupted, and is not moved to a thread (a
  thread hop per batch costs more than most stages do, and stages need not be
  thread-safe). Its duration on trio's clock is measured instead: one that took
  longer than ``stage_timeout_s`` counts as a failure, and its result is still
  used. A sync primary that hangs hangs the stage — bound its I/O itself.

Heartbeat batches (``pipeline.HEARTBEAT_EVENT``) pass a breaker stage untouched:
they never reach the primary, the fallback or the breaker's counts.

While the breaker is open, batches go straight to the fallback (reason
``circuit open``). Events the fallback cannot take (a full spool) are dropped
with reason ``spool full``; if the fallback itself raises, the batch is dropped
with reason ``fallback failed``. Every event thus ends in exactly one outcome.

Replay: when the primary is a sink that can take spooled batches back (it has
``write_spooled``, see :mod:`stages.spool_replay`; the JetStream sink does) and the fallback
is the spool, the spool keeps an index of its batches, and before the primary gets a new
batch, whatever the spool holds is replayed through it, oldest first, in groups of spooled
batches (the first group is the half-open trial). A replay that fails counts as a failure
and the new batch is spooled behind the rest, so the order is kept. Replayed events
already have their outcome (``fallback``): the replay adds statistics, not outcomes. If the
spool's files cannot be read (a corrupt index, a disk error), replay is turned off for the
run with one error line, and the spool is left as it is.

State transitions are logged (logger ``bpfpipe.breaker``: opening is a warning)
and exposed through ``statistics()`` and ``.breaker`` for metrics.

Configure it with import paths (TOML), or in Python with :meth:`CircuitBreakerStage.around`::

    [[stages]]
    use = "stages.breaker:CircuitBreakerStage"
    config = { primary = "myplugin:Enrich", fallback_config = { path = "/var/spool/bpfpipe/enrich.jsonl" } }

    NodeSpec("guarded", CircuitBreakerStage.around(Enrich), CircuitBreakerConfig(failure_threshold=3))
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol, Self

import msgspec
import trio

from pipeline import (
    HEARTBEAT_EVENT,
    Batch,
    BatchReceiver,
    BatchSender,
    BatchSink,
    Outcome,
    Sink,
    Stage,
    StageContext,
    StageLoadError,
    describe,
    resolve_stage,
)
from pipeline.breaker import BreakerState, BreakerStatistics, CircuitBreaker, Route, Transition

from .spool_replay import Replayable, SpooledBatch, replay_groups
from .spool_sink import SPOOL_FULL, SpoolSink

__all__ = [
    "CircuitBreakerConfig",
    "CircuitBreakerSink",
    "CircuitBreakerStage",
    "CircuitBreakerStatistics",
    "Fallback",
]

log = logging.getLogger("bpfpipe.breaker")

CIRCUIT_OPEN = "circuit open"
PRIMARY_FAILED = "primary failed"
PRIMARY_TIMED_OUT = "primary timed out"
FALLBACK_FAILED = "fallback failed"
REPLAY_GROUP_EVENTS = 65536
REPLAY_GROUP_BATCHES = 1024
"""Spooled batches are replayed in groups of up to this many events and batches: one
read, one call of the primary, one position update each."""
REPLAY_PENDING = "spool replay failed"
"""A batch spooled because the spool's replay (which must go first) failed."""


class CircuitBreakerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    primary: str = ""
    """What to protect: ``package.module:Class`` or a registered stage name. For
    ``CircuitBreakerStage`` a stage with ``process(batch)`` (a ``BatchStage``, or one
    whose ``process`` is ``async``); for ``CircuitBreakerSink`` a ``BatchSink``."""
    primary_config: dict[str, Any] = {}
    """The primary's own config table."""
    fallback: str = "stages.spool_sink:SpoolSink"
    """Where batches go while the primary cannot take them: a ``SpoolSink``-like class
    (with ``spool(batch) -> int``) or any ``BatchSink``."""
    fallback_config: dict[str, Any] = {}
    """The fallback's config, e.g. ``{path = "...", max_bytes = ...}`` for the spool. A
    ``SpoolSink`` without a ``path`` writes ``./bpfpipe-spool-<stage name>.jsonl``."""
    failure_threshold: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Consecutive failures that open the breaker."""
    reset_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """How long the breaker stays open before one trial batch tests the primary."""
    stage_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """A batch that takes the primary longer than this is a failure; 0 = no limit."""
    replay: bool = True
    """Replay the spool through the primary, in order, before new batches, when the primary
    can take spooled batches back (``write_spooled``) and the fallback is the spool."""


class Fallback(Protocol):
    """A breaker's fallback target. ``SpoolSink`` is one; any ``BatchSink`` is adapted."""

    async def spool(self, batch: Batch) -> int:
        """Keep a prefix of the batch; return its length (the rest is ``spool full``)."""
        ...

    async def aclose(self) -> None: ...


class _SinkFallback:
    """A plain ``BatchSink`` as a fallback: it takes whole batches or raises."""

    def __init__(self, sink: BatchSink) -> None:
        self._sink = sink

    async def spool(self, batch: Batch) -> int:
        await self._sink.write(batch)
        return len(batch)

    async def aclose(self) -> None:
        await self._sink.aclose()


@dataclass(frozen=True, slots=True)
class CircuitBreakerStatistics:
    breaker: BreakerStatistics
    primary_batches: int
    """Batches the primary completed (including slow ones)."""
    primary_errors: int
    primary_timeouts: int
    """Async primaries cancelled at the deadline, plus sync ones that overran it."""
    fallback_batches: int
    fallback_events: int
    """Events the fallback kept (recorded as ``Outcome.FALLBACK``)."""
    replayed_batches: int = 0
    replayed_events: int = 0
    """Spooled events the primary took on a replay (their outcome stays ``fallback``)."""

    @property
    def state(self) -> BreakerState:
        return self.breaker.state


_Bound = tuple[type[Any], Any]


class _Guard:
    """The shared shell: builds primary and fallback, routes one batch at a time."""

    def __init__(
        self,
        config: CircuitBreakerConfig,
        ctx: StageContext,
        *,
        primary_kind: type[Any],
        bound_primary: _Bound | None,
        bound_fallback: _Bound | None,
    ) -> None:
        self.ctx = ctx
        self.timeout_s = config.stage_timeout_s or math.inf
        self.breaker = CircuitBreaker(
            failure_threshold=config.failure_threshold,
            reset_timeout_s=config.reset_timeout_s,
            on_transition=self._log_transition,
        )
        self.primary = self._build_primary(config, primary_kind, bound_primary)
        replayable = config.replay and isinstance(self.primary, Replayable)
        self.fallback = self._build_fallback(config, bound_fallback, replay=replayable)
        self.replay_spool = self.fallback if replayable and isinstance(self.fallback, SpoolSink) else None
        """The spool to replay through the primary before new batches (None: no replay)."""
        self.replayed_bytes = -1
        """Bytes of the spool's index replayed (-1: not read from its file yet)."""
        self.replayed_batches = 0
        self.replayed_events = 0
        process: Any = getattr(self.primary, "write" if primary_kind is BatchSink else "process")
        self.call_sync: Callable[[Batch], Batch | None] | None = None
        self.call_async: Callable[[Batch], Awaitable[Batch | None]] | None = None
        if inspect.iscoroutinefunction(process):
            self.call_async = process
        else:
            self.call_sync = process
        self.primary_batches = 0
        self.primary_errors = 0
        self.primary_timeouts = 0
        self.fallback_batches = 0
        self.fallback_events = 0

    # -- building --------------------------------------------------------------------
    def _build_primary(self, config: CircuitBreakerConfig, kind: type[Any], bound: _Bound | None) -> Any:
        name = self.ctx.name
        if bound is not None:
            cls, raw = bound
        elif config.primary:
            cls, raw = resolve_stage(config.primary, stage=name), config.primary_config
        else:
            raise StageLoadError(
                name, "the breaker needs a primary: set config.primary = 'package.module:Class'"
            )
        if kind is BatchSink:
            ok = isinstance(cls, type) and issubclass(cls, BatchSink)
            wanted = "a BatchSink"
        else:
            ok = isinstance(cls, type) and issubclass(cls, Stage) and callable(getattr(cls, "process", None))
            wanted = "a stage with process(batch) (a BatchStage)"
        if not ok:
            raise StageLoadError(name, f"primary {describe(cls)} is not {wanted}")
        return self.ctx.build_child("primary", cls, raw, expect=kind, path="config.primary_config")

    def _build_fallback(
        self, config: CircuitBreakerConfig, bound: _Bound | None, *, replay: bool
    ) -> Fallback:
        name = self.ctx.name
        if bound is not None:
            cls, raw = bound
        else:
            cls, raw = resolve_stage(config.fallback, stage=name), config.fallback_config
        is_sink = isinstance(cls, type) and issubclass(cls, Sink)
        if not (is_sink and (callable(getattr(cls, "spool", None)) or issubclass(cls, BatchSink))):
            raise StageLoadError(
                name, f"fallback {describe(cls)} is not a sink with spool(batch) nor a BatchSink"
            )
        if cls is SpoolSink and (raw is None or (isinstance(raw, dict) and "path" not in raw)):
            # One spool file per breaker: two spools sharing a file would each think it had the room.
            safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            raw = {**(raw or {}), "path": f"bpfpipe-spool-{safe_name}.jsonl"}
        if cls is SpoolSink and replay:
            if isinstance(raw, msgspec.Struct):
                raw = msgspec.structs.replace(raw, replay_index=True)
            else:
                raw = {"replay_index": True, **(raw or {})}
        target = self.ctx.build_child("fallback", cls, raw, expect=Sink, path="config.fallback_config")
        if isinstance(target, SpoolSink) or callable(getattr(target, "spool", None)):
            spooler: Fallback = target
            return spooler
        assert isinstance(target, BatchSink)
        return _SinkFallback(target)

    def reconfigure(self, config: CircuitBreakerConfig) -> None:
        """New thresholds while running: the breaker's state and streak are kept (a streak
        already at a lowered threshold opens it at the next failure)."""
        self.timeout_s = config.stage_timeout_s or math.inf
        self.breaker.failure_threshold = config.failure_threshold
        self.breaker.reset_timeout_s = config.reset_timeout_s

    # -- routing ---------------------------------------------------------------------
    async def route(self, batch: Batch) -> tuple[bool, Batch | None]:
        """Send one batch where the breaker says. ``(True, result)`` if the primary
        took it (the caller forwards or delivers), ``(False, None)`` if the fallback
        did (already accounted)."""
        if self.breaker.allow(trio.current_time()) is Route.FALLBACK:
            await self.to_fallback(batch, CIRCUIT_OPEN)
            return False, None
        if self.replay_spool is not None and not await self._replay_first():
            await self.to_fallback(batch, REPLAY_PENDING)
            return False, None
        start = trio.current_time()
        out: Batch | None
        try:
            if self.call_async is not None:
                with trio.move_on_after(self.timeout_s) as scope:
                    out = await self.call_async(batch)
                if scope.cancelled_caught:
                    self.primary_timeouts += 1
                    took_s = trio.current_time() - start
                    self._warn_slow(batch, took_s, "cancelled; batch sent to the fallback")
                    self.breaker.on_failure(trio.current_time())
                    await self.to_fallback(batch, PRIMARY_TIMED_OUT)
                    return False, None
            else:
                assert self.call_sync is not None
                out = self.call_sync(batch)
        except Exception as exc:
            self.primary_errors += 1
            self.ctx.error(exc, "primary")
            self.breaker.on_failure(trio.current_time())
            await self.to_fallback(batch, PRIMARY_FAILED)
            return False, None
        now = trio.current_time()
        self.primary_batches += 1
        if now - start > self.timeout_s:
            self.primary_timeouts += 1
            self._warn_slow(batch, now - start, "counted as a failure; its result is used")
            self.breaker.on_failure(now)
        else:
            self.breaker.on_success(now)
        return True, out

    async def _replay_first(self) -> bool:
        try:
            return await self.replay()
        except (OSError, msgspec.DecodeError) as exc:
            self.ctx.error(exc, "spool replay (turned off for this run; the spool is kept)")
            self.replay_spool = None
            return True

    async def replay(self) -> bool:
        """Replay what the spool holds through the primary, oldest first; True when none
        is left. Each replayed batch's outcome goes to the breaker like a batch's; the
        first failure stops the replay (the position is kept) and returns False."""
        spool = self.replay_spool
        assert spool is not None
        files = spool.replay_files
        if self.replayed_bytes < 0:
            self.replayed_bytes = await trio.to_thread.run_sync(files.replayed_bytes)
        if await spool.index_size() <= self.replayed_bytes:
            if self.replayed_bytes:  # a stale position, the spool emptied under it
                await spool.empty()
                self.replayed_bytes = 0
            return True
        primary = self.primary
        assert isinstance(primary, Replayable)
        entries = await trio.to_thread.run_sync(files.pending)
        log.info(
            "replaying the spool through the primary: %d batches",
            len(entries),
            extra={"stage": self.ctx.name, "path": spool.config.path},
        )
        for group in replay_groups(entries, REPLAY_GROUP_EVENTS, REPLAY_GROUP_BATCHES):
            spooled = await trio.to_thread.run_sync(files.read, [entry for entry, _ in group])
            try:
                with trio.move_on_after(self.timeout_s) as scope:
                    await primary.write_spooled(spooled)
            except Exception as exc:
                self.primary_errors += 1
                self.ctx.error(exc, "primary (spool replay)")
                self.breaker.on_failure(trio.current_time())
                return False
            if scope.cancelled_caught:
                self.primary_timeouts += 1
                self._warn_slow_replay(spooled)
                self.breaker.on_failure(trio.current_time())
                return False
            index_offset = group[-1][1]
            await trio.to_thread.run_sync(files.mark_replayed, index_offset)
            self.replayed_bytes = index_offset
            self.replayed_batches += len(spooled)
            self.replayed_events += sum(batch.events for batch in spooled)
            self.breaker.on_success(trio.current_time())
        if self.replayed_bytes >= await spool.index_size():
            await spool.empty()
            self.replayed_bytes = 0
            log.info(
                "spool replayed: %d events in %d batches so far",
                self.replayed_events,
                self.replayed_batches,
                extra={"stage": self.ctx.name},
            )
        return True

    def _warn_slow_replay(self, spooled: list[SpooledBatch]) -> None:
        log.warning(
            "primary did not take %d spooled events within stage_timeout_s %g: replay stopped",
            sum(batch.events for batch in spooled),
            self.timeout_s,
            extra={"stage": self.ctx.name},
        )

    async def to_fallback(self, batch: Batch, reason: str) -> None:
        ctx = self.ctx
        try:
            kept = await self.fallback.spool(batch)
        except Exception as exc:
            ctx.error(exc, "fallback")
            ctx.drop_batch(batch, reason=FALLBACK_FAILED)
            return
        self.fallback_batches += 1
        self.fallback_events += kept
        weights = batch.weights
        ctx.record(Outcome.FALLBACK, kept, float(weights[:kept].sum()), reason=reason)
        ctx.drop(len(batch) - kept, float(weights[kept:].sum()), reason=SPOOL_FULL)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.fallback.aclose()
            finally:
                if isinstance(self.primary, BatchSink):
                    await self.primary.aclose()

    def statistics(self) -> CircuitBreakerStatistics:
        return CircuitBreakerStatistics(
            breaker=self.breaker.statistics(),
            primary_batches=self.primary_batches,
            primary_errors=self.primary_errors,
            primary_timeouts=self.primary_timeouts,
            fallback_batches=self.fallback_batches,
            fallback_events=self.fallback_events,
            replayed_batches=self.replayed_batches,
            replayed_events=self.replayed_events,
        )

    # -- logging ---------------------------------------------------------------------
    def _log_transition(self, t: Transition) -> None:
        extra = {"stage": self.ctx.name, "old_state": t.old, "new_state": t.new, "event": t.event}
        if t.new is BreakerState.OPEN:
            log.warning(
                "circuit breaker opened (%s): batches go to the fallback for %g s",
                "trial failed" if t.old is BreakerState.HALF_OPEN else "too many consecutive failures",
                self.breaker.reset_timeout_s,
                extra=extra,
            )
        elif t.new is BreakerState.HALF_OPEN:
            log.info("circuit breaker half-open: trying the primary with one batch", extra=extra)
        else:
            log.info("circuit breaker closed: the primary has recovered", extra=extra)

    def _warn_slow(self, batch: Batch, took_s: float, what: str) -> None:
        log.warning(
            "primary took %.3f s over a batch of %d events (stage_timeout_s %g): %s",
            took_s,
            len(batch),
            self.timeout_s,
            what,
            extra={"stage": self.ctx.name},
        )


class _Wrapping:
    """``around()``: bind primary (and fallback) classes in Python instead of by import path."""

    _bound_primary: ClassVar[_Bound | None] = None
    _bound_fallback: ClassVar[_Bound | None] = None
    _primary_kind: ClassVar[type[Any]]
    """What the primary must be: a ``Stage`` or a ``BatchSink``."""
    config: CircuitBreakerConfig

    def __init__(self, config: CircuitBreakerConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)  # type: ignore[call-arg]  # the Stage/Sink base takes them
        self.guard = _Guard(
            config,
            ctx,
            primary_kind=self._primary_kind,
            bound_primary=self._bound_primary,
            bound_fallback=self._bound_fallback,
        )

    live_config_fields: ClassVar[frozenset[str]] = frozenset(
        {"failure_threshold", "reset_timeout_s", "stage_timeout_s"}
    )
    """What :meth:`reconfigure` takes live (a config reload); a new primary or fallback
    needs a new stage (the reload switches the chain)."""

    def reconfigure(self, config: CircuitBreakerConfig) -> None:
        """Take new ``failure_threshold``, ``reset_timeout_s`` and ``stage_timeout_s``."""
        self.guard.reconfigure(config)
        self.config = config

    @property
    def breaker(self) -> CircuitBreaker:
        return self.guard.breaker

    def statistics(self) -> CircuitBreakerStatistics:
        return self.guard.statistics()

    @classmethod
    def around(
        cls,
        primary: type[Any],
        primary_config: Any = None,
        *,
        fallback: type[Sink] | None = None,
        fallback_config: Any = None,
    ) -> type[Self]:
        """A subclass bound to these classes, for :class:`~pipeline.NodeSpec` and
        ``run_stages``. Each config may be None (defaults), a table or a Config; the
        bound classes take precedence over ``config.primary``/``config.fallback``."""
        attrs: dict[str, Any] = {"_bound_primary": (primary, primary_config), "__module__": cls.__module__}
        if fallback is not None or fallback_config is not None:  # a config alone: for the spool
            attrs["_bound_fallback"] = (fallback or SpoolSink, fallback_config)
        return type(f"{cls.__name__}[{primary.__name__}]", (cls,), attrs)


class CircuitBreakerStage(_Wrapping, Stage):
    """Wraps a per-batch stage; the primary's results are sent on, fallback batches are not."""

    Config = CircuitBreakerConfig
    config: CircuitBreakerConfig

    _primary_kind = Stage

    async def run(
        self,
        rx: BatchReceiver,
        tx: BatchSender,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        ctx = self.ctx
        guard = self.guard
        task_status.started()
        try:
            async for batch in rx:
                if batch.event_name == HEARTBEAT_EVENT:  # not the primary's to process
                    await tx.send(batch)
                    continue
                took, out = await guard.route(batch)
                if not took:
                    continue
                # The primary's result, accounted as the runtime does for a BatchStage.
                if ctx.account_transform(batch, out):
                    assert out is not None
                    await tx.send(out)
        finally:
            await guard.aclose()


class CircuitBreakerSink(_Wrapping, Sink):
    """Wraps a ``BatchSink`` (an exporter): what it writes is delivered, the rest spooled."""

    Config = CircuitBreakerConfig
    config: CircuitBreakerConfig

    _primary_kind = BatchSink

    async def run(
        self, rx: BatchReceiver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        try:
            async for batch in rx:
                took, _ = await self.guard.route(batch)
                if took:
                    self.ctx.record(Outcome.DELIVERED, len(batch), batch.weight_sum)
        finally:
            await self.guard.aclose()
