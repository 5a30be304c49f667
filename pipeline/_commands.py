"""``bpfpipe run`` and ``bpfpipe check``: the heavy half of the command line.

Imported by ``pipeline.cli.main`` after it has installed its signal handlers (see
``pipeline._signals``), so that importing numpy, trio and the stages can be
interrupted like everything else. The exit codes and signal rules are in
``pipeline.cli``'s docstring.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import trio

from ._agent import build_agent
from ._build import build_pipeline, resolved_config
from ._graph import Pipeline
from ._log import flush_logging, setup_logging
from ._signals import HUP_MESSAGE, STOP_SIGNALS, Interrupted, SignalState, one_line, say
from .config import Config, decode_config, dump_config, merge_sources, read_toml

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
    raw = read_toml(path) if path is not None else {}
    return decode_config(merge_sources(raw, environ=os.environ, overrides=_cli_overrides(args, raw)))


@dataclass
class _RunOutcome:
    started: bool = False
    startup_signal: int | None = None
    """A stop signal arrived before the pipeline had started."""
    abort_signal: int | None = None
    """A stop signal arrived while it was already stopping: it aborted."""


async def _run(pipe: Pipeline, duration: float | None, outcome: _RunOutcome) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.warning(HUP_MESSAGE)
                    elif not outcome.started:
                        # Cancelling waits for a BPF compile in a worker thread to finish.
                        outcome.startup_signal = outcome.startup_signal or signum
                        # Whatever the cancellation breaks in a starting stage, the story is the signal.
                        SignalState.received = SignalState.received or signum
                        nursery.cancel_scope.cancel()
                    elif pipe.finished.is_set():
                        pass
                    elif pipe.stopping:
                        log.warning("second signal: aborting", extra={"signal": signum})
                        outcome.abort_signal = outcome.abort_signal or signum
                        pipe.abort()
                    else:
                        log.info("stopping: draining in-flight events", extra={"signal": signum})
                        pipe.stop()

            async def stop_after(seconds: float) -> None:
                await trio.sleep(seconds)
                log.info("duration reached: stopping", extra={"seconds": seconds})
                pipe.stop()

            nursery.start_soon(on_signals)
            if SignalState.received is not None:  # arrived before the receiver was open
                outcome.startup_signal = SignalState.received
                nursery.cancel_scope.cancel()
                return
            await nursery.start(pipe.run)
            outcome.started = True
            if duration is not None:
                nursery.start_soon(stop_after, duration)
            await pipe.finished.wait()
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
    config = _effective_config(args, args.config or os.environ.get("BPFPIPE_CONFIG"))
    setup_logging("debug" if config.enable_debug else config.log_level)
    agent = build_agent(config)
    agent.servers.bind()  # a busy port fails here, before any BPF program is compiled
    pipe = agent.pipeline
    outcome = _RunOutcome()
    # From here on our handler only records: inside trio, trio's receiver takes over; after
    # it, a late signal must not cut the final report short.
    SignalState.deferred = True
    trio.run(_run, pipe, args.duration, outcome)
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


def cmd_check(args: argparse.Namespace) -> int:
    config = _effective_config(args, args.config or os.environ.get("BPFPIPE_CONFIG"))
    # Resolve every stage, decode and resolve its config, construct it (without starting).
    pipe = build_pipeline(config)
    sys.stdout.write(dump_config(resolved_config(config, list(pipe.specs)), annotate=True))
    return 0
