"""The agent's startup and shutdown in the seed's order, one log line per step.

Theory of operation
-------------------
Startup (:data:`STARTUP_STEPS`): load config → initialise metrics → load programs
→ create maps → attach → start health server → mark ready. Shutdown
(:data:`SHUTDOWN_STEPS`): not ready → stop reading → drain → detach programs →
final metrics snapshot → close maps → unload.

Every step is one INFO line on the ``bpfpipe.steps`` logger, ``msg="<phase>:
<step>" step=... duration_ms=...`` plus what the step did. The three BPF steps
are logged by ``bpf.loader`` (it alone sees their boundaries); the rest here.
:class:`StepLog` is the one handler of that logger: it forwards each line to the
agent's log (when the configured level shows INFO), sends it to the supervisor
as ``STATUS=`` (sd_notify, :mod:`pipeline._notify`) whatever the level, and
remembers which step ran last, so a failure can name the step it broke.

Why shutdown is split between the source and this module: a BPF source that
detached its program when it stopped reading (its standalone behaviour, which
the tests of the reader rely on) would detach *before* the drain. The agent
therefore asks every :class:`ProgramOwner` node to defer that
(``defer_program_shutdown``); then on stop the source only stops reading — it
sends on what the ring held at that moment (in-flight work) and returns with
its program still attached, so the chain drains. :class:`Shutdown` then
detaches (``detach_programs``: what the kernel wrote between "stop reading" and
the detach is accounted as *drained*, reason ``shutdown: after stop reading``,
so the ledger and the ring accounting balance), writes the final metrics
snapshot, closes the maps (user space's handles: ring and wake-up mmaps) and
unloads (the program fds and bcc's module: the kernel frees programs and maps
with their last reference). These late steps run even when startup failed or a
second signal aborted the drain: nothing is left attached.

A second signal aborts the drain: what is still in flight is recorded as
dropped (reason ``shutdown``) and one line says so (``skipped=drain
abandoned_events=N``); the late steps still run, without waiting for in-flight
BPF runs (their events are recorded as drained).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._notify import Notifier
from .accounting import Outcome

if TYPE_CHECKING:
    from ._agent import Agent

__all__ = [
    "SHUTDOWN_STEPS",
    "STARTUP_STEPS",
    "STEP_LOGGER",
    "ProgramOwner",
    "Shutdown",
    "StepLog",
    "failing_step",
]

STEP_LOGGER = "bpfpipe.steps"
STARTUP_STEPS = (
    "load config",
    "initialise metrics",
    "load programs",
    "create maps",
    "attach",
    "start health server",
    "mark ready",
)
SHUTDOWN_STEPS = (
    "not ready",
    "stop reading",
    "drain",
    "detach programs",
    "final metrics snapshot",
    "close maps",
    "unload",
)
"""How often, while stopping, to look whether the source has returned (only then)."""

steps_log = logging.getLogger(STEP_LOGGER)


@runtime_checkable
class ProgramOwner(Protocol):
    """A source that owns BPF programs and lets the agent run its late shutdown steps
    (``stages.reader.RingBufferReader`` is one). Without ``defer_program_shutdown``
    the source detaches and unloads on its own when it stops reading."""

    def defer_program_shutdown(self) -> None:
        """From now on, stopping only stops reading; the program stays attached."""

    async def detach_programs(self, *, wait_s: float) -> tuple[int, int]:
        """Detach; account for what the kernel wrote since reading stopped (waiting up to
        ``wait_s`` for program runs in flight). Returns (programs detached, those events)."""

    def close_maps(self) -> int:
        """Close user space's handles on the maps; returns how many."""

    def unload_programs(self) -> int:
        """Free the programs (and with them the maps); returns how many."""


def log_step(phase: str, step: str, duration_s: float, **fields: Any) -> None:
    steps_log.info(
        f"{phase}: {step}", extra={"step": step, "duration_ms": round(duration_s * 1000, 1), **fields}
    )


class StepLog(logging.Handler):
    """The handler of ``bpfpipe.steps`` (see the module docstring); ``install`` it once
    logging is set up, ``uninstall`` it at the end."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__(logging.DEBUG)
        self.notifier = notifier
        self.done: list[str] = []
        self.finished_at: dict[str, float] = {}
        """``time.perf_counter()`` when each step's line was written."""
        self._saved: tuple[int, bool, list[logging.Handler]] | None = None

    def install(self) -> None:
        self._saved = (steps_log.level, steps_log.propagate, steps_log.handlers[:])
        steps_log.handlers[:] = [self]
        steps_log.setLevel(logging.INFO)  # the supervisor hears every step, whatever the log level
        steps_log.propagate = False

    def uninstall(self) -> None:
        if self._saved is not None:
            steps_log.level, steps_log.propagate, steps_log.handlers[:] = self._saved
            self._saved = None

    def emit(self, record: logging.LogRecord) -> None:
        step = getattr(record, "step", None)
        if isinstance(step, str):
            self.done.append(step)
            self.finished_at[step] = time.perf_counter()
            self.notifier.status(record.getMessage())
        agent_log = logging.getLogger("bpfpipe")
        if agent_log.isEnabledFor(record.levelno):
            for handler in agent_log.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


def failing_step(done: list[str]) -> str:
    """The startup step that was running when startup failed: the one after the last done."""
    last = max((STARTUP_STEPS.index(s) for s in done if s in STARTUP_STEPS), default=-1)
    return STARTUP_STEPS[min(last + 1, len(STARTUP_STEPS) - 1)]


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the seconds it took."""
    out = [0.0]
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - start


class Shutdown:
    """Runs the shutdown steps of one agent run (see the module docstring)."""

    def __init__(self, agent: Agent, notifier: Notifier) -> None:
        self.agent = agent
        self.notifier = notifier
        pipe = agent.pipeline
        self.owners = [node for node in pipe.nodes if isinstance(node, ProgramOwner)]
        self.stop_at: float | None = None
        self.inflight_at_stop = 0
        self.abandoned = 0
        self.aborted = False
        self._stop_reading_logged = False
        self._late_done = False

    def defer_program_shutdown(self) -> None:
        for owner in self.owners:
            owner.defer_program_shutdown()

    def begin(self, reason: str, **fields: Any) -> None:
        """Graceful stop: not ready at once (``pipe.stop()`` first), then tell the supervisor."""
        pipe = self.agent.pipeline
        start = time.perf_counter()
        pipe.stop()  # first: /health/ready answers 503 from here on
        if self.stop_at is not None:
            return
        self.stop_at = start
        self.inflight_at_stop = pipe.budget.statistics().events
        self.notifier.stopping(f"shutdown: {reason}")
        log_step(
            "shutdown",
            "not ready",
            time.perf_counter() - start,
            reason=reason,
            inflight_events=self.inflight_at_stop,
            **fields,
        )

    def abort(self, signum: int) -> None:
        """A second signal: skip the rest of the drain; what is in flight is dropped (``shutdown``)."""
        pipe = self.agent.pipeline
        self.aborted = True
        self.abandoned = pipe.budget.statistics().events
        pipe.abort()
        steps_log.warning(
            "shutdown: second signal, skipping the rest of the drain",
            extra={
                "signal": signum,
                "skipped": "drain",
                "abandoned_events": self.abandoned,
                "abandoned_outcome": f"{Outcome.STAGE_DROPPED.value} (reason shutdown)",
            },
        )

    async def watch_stop_reading(self) -> None:
        """Log "stop reading" once the source has returned (its channel closed); if the
        drain's line comes first, :meth:`drained` writes this one just before it."""
        await self.agent.pipeline.source_done.wait()
        self._log_stop_reading()

    def _log_stop_reading(self) -> None:
        if self._stop_reading_logged or self.stop_at is None:
            return
        self._stop_reading_logged = True
        source = self.agent.pipeline.statistics().stages[0]
        log_step(
            "shutdown",
            "stop reading",
            time.perf_counter() - self.stop_at,
            source=source.name,
            sent_events=source.sent_events,
        )

    def drained(self) -> None:
        """The pipeline has finished: every node returned, every admitted event has an outcome."""
        if self.stop_at is None:  # the source ended on its own (total_events, a failure)
            self.stop_at = time.perf_counter()
            self._stop_reading_logged = True  # no stop was asked for: nothing to tell
            self.notifier.stopping("shutdown: the source ended")
        self._log_stop_reading()
        pipe = self.agent.pipeline
        ledger = pipe.ledger.snapshot()
        log_step(
            "shutdown",
            "drain",
            time.perf_counter() - self.stop_at,
            inflight_at_stop=self.inflight_at_stop,
            pending=ledger.pending,
            drain_timeout_s=pipe.settings.shutdown.drain_timeout_s,
            timed_out=pipe.drain_timed_out,
            aborted=self.aborted,
        )

    async def finish(self, *, quiet_if_idle: bool = False) -> None:
        """The late steps: detach, final snapshot, close maps, unload (once; the caller
        shields it). ``quiet_if_idle`` (startup did not finish): no lines and no snapshot
        unless a program was loaded, so a startup error stays one line."""
        if self._late_done:
            return
        self._late_done = True
        fast = self.aborted or self.agent.pipeline.drain_timed_out or quiet_if_idle
        with timed() as t:
            programs = after_stop = 0
            for owner in self.owners:
                detached, events = await owner.detach_programs(wait_s=0.0 if fast else 2.0)
                programs += detached
                after_stop += events
        if quiet_if_idle and not programs:  # nothing was loaded: no lines, nothing to snapshot
            for owner in self.owners:
                owner.close_maps()
                owner.unload_programs()
            return
        log_step(
            "shutdown",
            "detach programs",
            t[0],
            programs=programs,
            events_after_stop=after_stop,
            after_stop_outcome=f"{Outcome.DRAINED.value} (reason shutdown: after stop reading)",
        )
        if not quiet_if_idle:
            with timed() as t:
                fields = self._snapshot()
            log_step("shutdown", "final metrics snapshot", t[0], **fields)
        with timed() as t:
            closed = sum(owner.close_maps() for owner in self.owners)
        log_step("shutdown", "close maps", t[0], maps=closed)
        with timed() as t:
            unloaded = sum(owner.unload_programs() for owner in self.owners)
        log_step("shutdown", "unload", t[0], programs=unloaded)

    def _snapshot(self) -> dict[str, Any]:
        """The final metrics (Prometheus text) to ``shutdown.metrics_snapshot_file`` if set,
        and the ledger's totals as fields of the step's line."""
        agent = self.agent
        pipe = agent.pipeline
        ledger = pipe.ledger.snapshot()
        fields: dict[str, Any] = {"produced": ledger.produced, "pending": ledger.pending}
        fields.update({f"outcome_{k}": v for k, v in ledger.by_outcome().items() if v})
        path = agent.config.shutdown.metrics_snapshot_file
        if not path:
            return fields
        text = agent.metrics.snapshot_text(pipe)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            steps_log.warning(
                "final metrics snapshot: cannot write %s: %s",
                path,
                exc.strerror or exc,
                extra={"file": path},
            )
            with suppress(OSError):
                os.unlink(tmp)
            return fields
        return {"file": path, "bytes": len(text.encode()), **fields}
