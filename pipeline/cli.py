"""The ``bpfpipe`` command.

    bpfpipe run [--config FILE] [--source NAME] [--sink NAME] [--duration S]
    bpfpipe check CONFIG
    bpfpipe --version
    bpfpipe diag | top | tap STAGE   (clients of a running agent: pipeline._diag; exit 4 = no agent)
    bpfpipe policy get | set FILE | status [--node N] [--servers URLS]   (fleet policy: pipeline.fleet)

Errors are one line on stderr and an exit code (1 runtime, 2 config/usage,
3 BPF unavailable); a traceback only with ``--debug`` (or ``enable_debug``). A
startup failure other than a config error ends with ``(startup step: <step>)``.

``run`` starts and stops in the seed's order, one ``bpfpipe.steps`` log line per
step (``pipeline._lifecycle``; README "Lifecycle"): load config → initialise
metrics → load programs → create maps → attach → start health server → mark
ready; on a stop: not ready → stop reading → drain → detach programs → final
metrics snapshot → close maps → unload. With ``$NOTIFY_SOCKET`` set it speaks
sd_notify (``pipeline._notify``): ``STATUS=`` per step, ``READY=1``,
``STOPPING=1``, and ``WATCHDOG=1`` when ``$WATCHDOG_USEC`` is set.

Signals, at any moment after ``main`` is entered:

* SIGINT/SIGTERM before the pipeline has started (config, imports of plug-ins,
  BPF compile and attach): one line ``bpfpipe: interrupted during startup`` and
  exit 130 (SIGINT) or 143 (SIGTERM). A BPF compile in progress is let finish
  first (a few seconds at most); further signals meanwhile change nothing.
* The first SIGINT/SIGTERM once running: graceful stop (readiness 503 at once,
  the source stops reading, what was admitted drains, then programs are
  detached), the accounting line, exit 0. The drain has a deadline,
  ``shutdown.drain_timeout_s``; past it the pipeline aborts and exits 1.
* A second SIGINT/SIGTERM while draining: abort (leftovers recorded as dropped,
  reason ``shutdown``; one line says the drain was skipped and how many events it
  abandoned; programs are still detached and unloaded), the accounting line,
  exit 130/143 for that second signal.
* SIGHUP: live reload of the config file (:mod:`pipeline.reload`); before the
  pipeline has started or while it stops, one warning line and nothing else.
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
from typing import Any, NoReturn

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
  bpfpipe diag                                 ask the running agent for its report
  bpfpipe policy status --servers nats://h:4222  what each agent of the fleet runs
environment: BPFPIPE_CONFIG (config file), BPF_LOG_LEVEL, METRICS_PORT, BPF_DEBUG
exit codes: 0 ok (also a graceful stop by SIGINT/SIGTERM), 1 runtime failure (or a
  drain past shutdown.drain_timeout_s), 2 bad config or usage (busy port included),
  3 BPF unavailable or rejected, 130/143 interrupted by SIGINT/SIGTERM during startup
  (or a drain aborted by a second one); diag/top/tap: 4 no agent answering
systemd: Type=notify via $NOTIFY_SOCKET (READY=1, STATUS=, STOPPING=1, WATCHDOG=1)
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
    _add_client_commands(sub)
    from ._plan import add_capacity_parser  # stdlib only

    add_capacity_parser(sub)
    from ._policy_cli import add_policy_parser  # stdlib only; the policy code and nats-py on use

    add_policy_parser(sub)
    return parser


CLIENT_EXIT_CODES = """\
exit codes: 0 ok (diag: healthy), 1 unhealthy (diag) or the agent answered wrongly,
  2 bad usage or config (unknown stage, wrong token), 4 no agent answering
"""


def _add_client_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """``diag``, ``top`` and ``tap``: clients of a running agent (see ``pipeline._diag``)."""

    def client(name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_text,
            epilog=f"examples:\n{examples}{CLIENT_EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--config", metavar="FILE", help="the agent's config, for its ports (default: $BPFPIPE_CONFIG)"
        )
        return p

    def health_address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", metavar="H", help="agent address (default: loopback, or health_bind)")
        p.add_argument("--port", type=int, metavar="P", help="health port (default: health_check_port)")

    diag = client(
        "diag",
        "report on a running agent: programs, maps, performance, health",
        "  bpfpipe diag                       ask the agent on 127.0.0.1:health_check_port\n"
        "  bpfpipe diag --port 18080\n",
    )
    health_address(diag)
    diag.add_argument("--timeout", type=_positive_seconds, default=5.0, metavar="S", help="HTTP timeout")
    top = client(
        "top",
        "live view of a running agent (q or Ctrl-C quits)",
        "  bpfpipe top --interval 2\n",
    )
    health_address(top)
    top.add_argument("--interval", type=_positive_seconds, default=1.0, metavar="S", help="refresh every S s")
    tap = client(
        "tap",
        "print live events leaving a stage, as JSON lines (admin API)",
        "  bpfpipe tap decoder --count 5      5 events leaving the stage 'decoder'\n",
    )
    tap.add_argument("stage", metavar="STAGE", help="the stage's name (as in /status)")
    tap.add_argument("--count", type=int, default=10, metavar="N", help="events to print (default 10)")
    tap.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, metavar="S", help="give up after S s (default 10)"
    )
    tap.add_argument("--admin-host", metavar="H", help="admin address (default: loopback, or admin_bind)")
    tap.add_argument("--admin-port", type=int, metavar="P", help="admin port (default: admin_port)")
    tap.add_argument("--token-file", metavar="F", help="bearer token file (default: admin_token_file)")


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
        if args.command == "capacity":
            from ._plan import cmd_capacity

            return cmd_capacity(args)
        if args.command == "policy":
            from ._policy_cli import cmd_policy

            return cmd_policy(args)
        if args.command in ("diag", "top", "tap"):
            from . import _diag  # the clients: urllib, and rich for top

            return int(getattr(_diag, f"cmd_{args.command}")(args))
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
