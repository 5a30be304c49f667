"""The ``bpfpipe`` command.

    bpfpipe run [--config FILE] [--source NAME] [--sink NAME] [--duration S]
    bpfpipe check CONFIG
    bpfpipe --version

Errors are one line on stderr and an exit code (1 runtime, 2 config/usage,
3 BPF unavailable); a traceback only with ``--debug`` (or ``enable_debug``).

Signals, at any moment after ``main`` is entered:

* SIGINT/SIGTERM before the pipeline has started (config, imports of plug-ins,
  BPF compile and attach): one line ``bpfpipe: interrupted during startup`` and
  exit 130 (SIGINT) or 143 (SIGTERM). A BPF compile in progress is let finish
  first (a few seconds at most); further signals meanwhile change nothing.
* The first SIGINT/SIGTERM once running: graceful stop (the source stops, what
  was admitted drains), the accounting line, exit 0. The drain has a deadline,
  ``shutdown.drain_timeout_s``; past it the pipeline aborts and exits 1.
* A second SIGINT/SIGTERM while draining: abort (leftovers recorded as dropped,
  reason ``shutdown``), the accounting line, exit 130/143 for that second signal.
* SIGHUP: logged and ignored until live reload exists.
* Once the pipeline has finished, signals are ignored while the report is written.

Not covered: the ~0.2 s in which Python imports this package, before ``main`` runs
(there SIGINT is Python's KeyboardInterrupt and SIGTERM the default action).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

import trio

from . import __version__
from ._build import build_pipeline, resolved_config
from ._graph import Pipeline
from ._log import flush_logging, setup_logging
from .config import Config, decode_config, dump_config, merge_sources, read_toml
from .errors import BpfpipeError

log = logging.getLogger("bpfpipe.cli")

EXAMPLES = """\
examples:
  bpfpipe run                                  run the default config until Ctrl-C
  bpfpipe run --source synthetic --duration 5  try the pipeline without a kernel
  bpfpipe run --config /etc/bpfpipe.toml --sink null
  bpfpipe check /etc/bpfpipe.toml              validate; print the effective config
environment: BPFPIPE_CONFIG (config file), BPF_LOG_LEVEL, METRICS_PORT, BPF_DEBUG
exit codes: 0 ok, 1 runtime failure, 2 bad config or usage, 3 BPF unavailable,
  130/143 interrupted by SIGINT/SIGTERM during startup (or aborted by a second one)
"""

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HUP_MESSAGE = "SIGHUP: live reload is not implemented yet; carrying on"


def _say(message: str) -> None:
    """Print one line for people on stderr, after any log lines still queued."""
    flush_logging()
    print(message, file=sys.stderr)


def one_line(text: str) -> str:
    """``text`` with its line breaks collapsed, so an error is always one line."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


class _Interrupted(BaseException):
    """Raised by our signal handler outside trio; not an Exception, so nothing on the
    way (a plug-in's ``except Exception``) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalState:
    """Signals that arrived while trio was not listening. Inside ``trio.run`` the
    handler only records (trio's own receiver takes over once ``_run`` opens it)."""

    received: int | None = None
    deferred = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGHUP:
        log.warning(_HUP_MESSAGE)
        return
    if _SignalState.received is None:
        _SignalState.received = signum
    if not _SignalState.deferred:
        raise _Interrupted(signum)


def _install_signal_handlers() -> dict[int, Any]:
    previous: dict[int, Any] = {}
    for signum in (*_STOP_SIGNALS, signal.SIGHUP):
        previous[signum] = signal.signal(signum, _on_signal)
    _SignalState.received = None
    _SignalState.deferred = False
    return previous


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bpfpipe: error: {one_line(message)} (see 'bpfpipe --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bpfpipe",
        description="eBPF event pipeline agent: kernel ring buffers → stages → exporters.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bpfpipe {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", metavar="NAME", help="source stage to use (e.g. synthetic)")
        p.add_argument("--sink", metavar="NAME", help="sink stage to use (e.g. jsonl, null)")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])
        p.add_argument("--metrics-port", type=int, metavar="PORT")

    run = sub.add_parser(
        "run", help="run the pipeline", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run.add_argument("--config", metavar="FILE", help="TOML config (default: $BPFPIPE_CONFIG)")
    run.add_argument(
        "--duration", type=_positive_seconds, metavar="SECONDS", help="stop gracefully after this long"
    )
    common(run)
    check = sub.add_parser("check", help="validate a config and print the effective config")
    check.add_argument("config", metavar="CONFIG", nargs="?", help="TOML config (default: $BPFPIPE_CONFIG)")
    common(check)
    return parser


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
    with trio.open_signal_receiver(*_STOP_SIGNALS, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.warning(_HUP_MESSAGE)
                    elif not outcome.started:
                        # Cancelling waits for a BPF compile in a worker thread to finish.
                        outcome.startup_signal = outcome.startup_signal or signum
                        # Whatever the cancellation breaks in a starting stage, the story is the signal.
                        _SignalState.received = _SignalState.received or signum
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
            if _SignalState.received is not None:  # arrived before the receiver was open
                outcome.startup_signal = _SignalState.received
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


def _cmd_run(args: argparse.Namespace) -> int:
    config = _effective_config(args, args.config or os.environ.get("BPFPIPE_CONFIG"))
    setup_logging("debug" if config.enable_debug else config.log_level)
    pipe = build_pipeline(config)
    outcome = _RunOutcome()
    # From here on our handler only records: inside trio, trio's receiver takes over; after
    # it, a late signal must not cut the final report short.
    _SignalState.deferred = True
    trio.run(_run, pipe, args.duration, outcome)
    if outcome.startup_signal is not None:
        raise _Interrupted(outcome.startup_signal)
    _report(pipe)
    if outcome.abort_signal is not None:
        _say("bpfpipe: aborted by a second signal")
        return 128 + outcome.abort_signal
    if pipe.drain_timed_out:
        timeout = config.shutdown.drain_timeout_s
        _say(
            f"bpfpipe: error: draining did not finish within shutdown.drain_timeout_s = {timeout:g} s;"
            " aborted (what was in flight is recorded as dropped, reason 'shutdown')"
        )
        return 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    config = _effective_config(args, args.config or os.environ.get("BPFPIPE_CONFIG"))
    # Resolve every stage, decode and resolve its config, construct it (without starting).
    pipe = build_pipeline(config)
    sys.stdout.write(dump_config(resolved_config(config, list(pipe.specs)), annotate=True))
    return 0


def _find_error(exc: BaseException) -> BpfpipeError | None:
    if isinstance(exc, BpfpipeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_error(inner)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    previous = _install_signal_handlers()
    debug = False
    try:
        args = _parser().parse_args(argv)
        debug = args.debug or os.environ.get("BPF_DEBUG", "").lower() in {"1", "true", "yes", "on"}
        return _cmd_run(args) if args.command == "run" else _cmd_check(args)
    except SystemExit:
        if _SignalState.received is None:
            raise
        return _interrupted(_SignalState.received)
    except BaseException as exc:
        if debug:
            traceback.print_exc()
        if _SignalState.received is not None:
            # Whatever the signal broke on its way in (a plug-in's import, a worker
            # thread), the story is the signal.
            return _interrupted(_SignalState.received)
        if isinstance(exc, _Interrupted):
            return _interrupted(exc.signum)
        if isinstance(exc, KeyboardInterrupt):
            return _interrupted(signal.SIGINT)
        error = _find_error(exc)
        if error is not None:
            _say(f"bpfpipe: error: {one_line(str(error))}")
            return error.exit_code
        hint = "" if debug else " (run with --debug for a traceback)"
        _say(f"bpfpipe: internal error: {type(exc).__name__}: {one_line(str(exc))}{hint}")
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupted(signum: int) -> int:
    _say("bpfpipe: interrupted during startup")
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
