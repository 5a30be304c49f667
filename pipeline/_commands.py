"""``bpfpipe run`` and ``bpfpipe check``: the heavy half of the command line.

Imported by ``pipeline.cli.main`` after it has installed its signal handlers (see
``pipeline._signals``), so that importing numpy, trio and the stages can be
interrupted like everything else. The exit codes and signal rules are in
``pipeline.cli``'s docstring.

``bpfpipe run`` is the agent's lifecycle in the seed's order (the steps and why
they sit where they do: ``pipeline._lifecycle``): startup step lines, sd_notify
(``pipeline._notify``: ``STATUS=`` per step, ``READY=1``, ``WATCHDOG=1`` from
the trio loop, ``STOPPING=1``), and a shutdown whose first act on a stop signal
is ``pipe.stop()`` (readiness answers 503 from then on). A startup failure that
is not a config error (exit 2, whose line names the key) or another stage's
(whose line names the stage) gets ``(startup step: ...)`` appended to its line.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

from ._agent import Agent, build_agent
from ._build import build_pipeline, resolved_config
from ._graph import Pipeline
from ._lifecycle import Shutdown, StepLog, failing_step, log_step, timed
from ._log import flush_logging, setup_logging
from ._notify import Notifier
from ._signals import STOP_SIGNALS, Interrupted, SignalState, one_line, say
from ._watch import ConfigWatcher
from .config import Config, decode_config, dump_config, merge_sources, read_toml
from .errors import BpfpipeError, StageStartError
from .reload import Reloader

__all__ = ["cmd_check", "cmd_run"]

log = logging.getLogger("bpfpipe.cli")


def _cli_overrides(args: argparse.Namespace, file_raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.log_level:
        out["log_level"] = args.log_level
    if args.metrics_port is not None:
        out["metrics_port"] = args.metrics_port
    for end in ("source", "sink"):
        use = getattr(args, end)
        if use:
            # A different stage does not take the old one's settings.
            current = file_raw.get(end)
            same = isinstance(current, dict) and current.get("use") == use
            out[end] = {"use": use} if same else {"use": use, "config": {}}
    if args.debug:
        out["enable_debug"] = True
    return out


def _effective_config(args: argparse.Namespace, path: str | None) -> Config:
    """Defaults < file < environment < flags; an environment value a flag overrides
    is not read, so a bad one there is no error."""
    return decode_config(_config_document(args, path))


def _config_document(args: argparse.Namespace, path: str | None) -> dict[str, Any]:
    """The merged document, undecoded (what SIGHUP re-reads: ``Reloader.read_config``)."""
    raw = read_toml(path) if path is not None else {}
    return merge_sources(raw, environ=os.environ, overrides=_cli_overrides(args, raw))


@dataclass
class _RunOutcome:
    started: bool = False
    startup_signal: int | None = None
    """A stop signal arrived before the pipeline had started."""
    abort_signal: int | None = None
    """A stop signal arrived while it was already stopping: it aborted."""


class _StartupFailed(BpfpipeError):
    """A startup failure, its one line naming the step it broke (exit code kept)."""

    def __init__(self, error: BpfpipeError, step: str) -> None:
        self.exit_code = error.exit_code
        super().__init__(f"{one_line(str(error))} (startup step: {step})")


async def _run(
    agent: Agent,
    duration: float | None,
    outcome: _RunOutcome,
    notifier: Notifier,
    steps: StepLog,
    reloader: Reloader | None = None,
) -> None:
    pipe = agent.pipeline
    shutdown = Shutdown(agent, notifier)
    shutdown.defer_program_shutdown()  # detach after the drain, not when reading stops
    try:
        await _serve(pipe, shutdown, duration, outcome, notifier, steps, reloader)
    finally:
        with trio.CancelScope(shield=True):  # whatever happened, nothing stays attached
            await shutdown.finish(quiet_if_idle=not outcome.started)


async def _serve(
    pipe: Pipeline,
    shutdown: Shutdown,
    duration: float | None,
    outcome: _RunOutcome,
    notifier: Notifier,
    steps: StepLog,
    reloader: Reloader | None,
) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            def stop(reason: str, **fields: Any) -> None:
                if not pipe.stopping:
                    nursery.start_soon(shutdown.watch_stop_reading)
                shutdown.begin(reason, **fields)  # pipe.stop() first: readiness 503 at once

            async def on_signals() -> None:
                async for signum in signals:
                    # SIGHUP: live reload's branch (the reload work owns it) -------------------
                    if signum == signal.SIGHUP:
                        if reloader is None or not outcome.started or pipe.stopping:
                            log.warning("SIGHUP: not reloading, the pipeline is not running")
                        else:
                            nursery.start_soon(reloader.reload_file)  # serialized by its lock
                    # SIGINT/SIGTERM: the lifecycle (pipeline._lifecycle) ------------------------
                    elif not outcome.started:
                        # Cancelling waits for a BPF compile in a worker thread to finish.
                        outcome.startup_signal = outcome.startup_signal or signum
                        # Whatever the cancellation breaks in a starting stage, the story is the signal.
                        SignalState.received = SignalState.received or signum
                        nursery.cancel_scope.cancel()
                    elif pipe.finished.is_set():
                        pass
                    elif pipe.stopping:
                        outcome.abort_signal = outcome.abort_signal or signum
                        shutdown.abort(signum)  # logs which steps it skips, what it abandons
                    else:
                        stop(f"signal {signal.Signals(signum).name}", signal=signum)

            async def stop_after(seconds: float) -> None:
                await trio.sleep(seconds)
                log.info("duration reached: stopping", extra={"seconds": seconds})
                stop("duration reached", seconds=seconds)

            nursery.start_soon(notifier.run_watchdog)
            nursery.start_soon(on_signals)
            if SignalState.received is not None:  # arrived before the receiver was open
                outcome.startup_signal = SignalState.received
                nursery.cancel_scope.cancel()
                return
            began = time.perf_counter()
            await nursery.start(pipe.run)
            outcome.started = True
            # Helpers, the servers among them, start once every node has, the source last
            # (loaded, maps created, attached): this step is what follows "attach".
            log_step(
                "startup",
                "start health server",
                time.perf_counter() - steps.finished_at.get("attach", began),
                servers=",".join(f"{k}:{v}" for k, v in shutdown.agent.servers.ports.items()) or "none",
            )
            with timed() as t:
                notifier.ready("running")
            log_step("startup", "mark ready", t[0], notify_socket=notifier.enabled)
            if duration is not None:
                nursery.start_soon(stop_after, duration)
            await pipe.finished.wait()
            shutdown.drained()
            nursery.cancel_scope.cancel()


def _report(pipe: Pipeline) -> None:
    flush_logging()  # repeats folded during the run are told before its totals
    ledger = pipe.ledger.snapshot()
    fields = {f"outcome_{k}": v for k, v in ledger.by_outcome().items() if v}
    log.info("pipeline finished", extra={"produced": ledger.produced, "pending": ledger.pending, **fields})
    for s in pipe.statistics().stages:
        if s.errors:
            log.warning("stage had errors", extra={"stage": s.name, "errors": s.errors, "last": s.last_error})


def cmd_run(args: argparse.Namespace) -> int:
    notifier = Notifier()
    steps = StepLog(notifier)
    try:
        return _cmd_run(args, notifier, steps)
    finally:
        steps.uninstall()
        notifier.close()


def _cmd_run(args: argparse.Namespace, notifier: Notifier, steps: StepLog) -> int:
    path = args.config or os.environ.get("BPFPIPE_CONFIG")
    with timed() as load_config:
        config = _effective_config(args, path)
    setup_logging("debug" if config.enable_debug else config.log_level)
    steps.install()
    with timed() as initialise:
        agent = build_agent(config)
        agent.reloader.read_config = functools.partial(_config_document, args, path)
        if path and config.watch_config:
            watcher = ConfigWatcher(path, agent.reloader.reload_file)
            agent.pipeline.helpers = (*agent.pipeline.helpers, watcher.run)
        agent.servers.bind()  # a busy port fails here, before any BPF program is compiled
    # Both lines once both steps have succeeded: a config error stays the one line it is.
    log_step("startup", "load config", load_config[0], file=path or "")
    log_step(
        "startup",
        "initialise metrics",
        initialise[0],
        stages=len(agent.pipeline.specs),
        ports=",".join(f"{k}:{s.getsockname()[1]}" for k, s in agent.servers.sockets.items()) or "none",
    )
    pipe = agent.pipeline
    outcome = _RunOutcome()
    # From here on our handler only records: inside trio, trio's receiver takes over; after
    # it, a late signal must not cut the final report short.
    SignalState.deferred = True
    try:
        trio.run(_run, agent, args.duration, outcome, notifier, steps, agent.reloader)
    except BaseException as exc:
        error = None if outcome.started else _startup_error(exc, pipe)
        if error is not None and SignalState.received is None:
            raise _StartupFailed(error, failing_step(steps.done)) from exc
        raise
    if outcome.startup_signal is not None:
        raise Interrupted(outcome.startup_signal)
    _report(pipe)
    if outcome.abort_signal is not None:
        say("bpfpipe: aborted by a second signal")
        return 128 + outcome.abort_signal
    if pipe.failure is not None:
        say(f"bpfpipe: error: {one_line(pipe.failure)}; stopped (the rest is recorded as dropped)")
        return 1
    if pipe.drain_timed_out:
        timeout = config.shutdown.drain_timeout_s
        say(
            f"bpfpipe: error: draining did not finish within shutdown.drain_timeout_s = {timeout:g} s;"
            " aborted (what was in flight is recorded as dropped, reason 'shutdown')"
        )
        return 1
    return 0


def _startup_error(exc: BaseException, pipe: Pipeline) -> BpfpipeError | None:
    """The error to annotate with its startup step: not a config error (its line names
    the key), not another stage's failure to start (its line names the stage)."""
    found: BpfpipeError | None = None
    pending: list[BaseException] = [exc]
    while pending and found is None:
        current = pending.pop()
        if isinstance(current, BpfpipeError):
            found = current
        elif isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
    if found is None or found.exit_code == 2:
        return None
    if isinstance(found, StageStartError) and found.stage != pipe.specs[0].name:
        return None
    return found


def cmd_check(args: argparse.Namespace) -> int:
    config = _effective_config(args, args.config or os.environ.get("BPFPIPE_CONFIG"))
    # Resolve every stage, decode and resolve its config, construct it (without starting).
    pipe = build_pipeline(config)
    sys.stdout.write(dump_config(resolved_config(config, list(pipe.specs)), annotate=True))
    return 0
