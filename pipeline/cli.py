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

Covered from the moment ``main`` runs, some 40 ms after exec (the interpreter's
start and this light module); numpy, trio and the stages are imported after the
handlers are in place (``pipeline._commands``). Before that, SIGINT is Python's
default (a KeyboardInterrupt) and SIGTERM the default action (exit 143, silent).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

# Only light imports here: main() installs the signal handlers before the heavy ones.
from . import __version__
from ._signals import Interrupted, SignalState, install_signal_handlers, one_line, say
from .errors import BpfpipeError

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
    previous = install_signal_handlers()
    debug = False
    try:
        args = _parser().parse_args(argv)
        debug = args.debug or os.environ.get("BPF_DEBUG", "").lower() in {"1", "true", "yes", "on"}
        from ._commands import cmd_check, cmd_run  # numpy, trio, the stages: ~0.2 s

        return cmd_run(args) if args.command == "run" else cmd_check(args)
    except SystemExit:
        if SignalState.received is None:
            raise
        return _interrupted(SignalState.received)
    except BaseException as exc:
        if debug:
            traceback.print_exc()
        if SignalState.received is not None:
            # Whatever the signal broke on its way in (a plug-in's import, a worker
            # thread), the story is the signal.
            return _interrupted(SignalState.received)
        if isinstance(exc, Interrupted):
            return _interrupted(exc.signum)
        if isinstance(exc, KeyboardInterrupt):
            return _interrupted(signal.SIGINT)
        error = _find_error(exc)
        if error is not None:
            say(f"bpfpipe: error: {one_line(str(error))}")
            return error.exit_code
        hint = "" if debug else " (run with --debug for a traceback)"
        say(f"bpfpipe: internal error: {type(exc).__name__}: {one_line(str(exc))}{hint}")
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupted(signum: int) -> int:
    say("bpfpipe: interrupted during startup")
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
