"""The ``bpfpipe`` command.

    bpfpipe run [--config FILE] [--source NAME] [--sink NAME] [--duration S]
    bpfpipe check CONFIG
    bpfpipe --version

Errors are one line on stderr and an exit code (1 runtime, 2 config/usage,
3 BPF unavailable); a traceback only with ``--debug`` (or ``enable_debug``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import trio

from . import __version__
from ._build import build_pipeline, resolved_config
from ._graph import Pipeline
from ._log import setup_logging
from .config import Config, dump_config, load_config
from .errors import BpfpipeError

log = logging.getLogger("bpfpipe.cli")

EXAMPLES = """\
examples:
  bpfpipe run                                  run the default config until Ctrl-C
  bpfpipe run --source synthetic --duration 5  try the pipeline without a kernel
  bpfpipe run --config /etc/bpfpipe.toml --sink null
  bpfpipe check /etc/bpfpipe.toml              validate; print the effective config
environment: BPFPIPE_CONFIG (config file), BPF_LOG_LEVEL, METRICS_PORT, BPF_DEBUG
exit codes: 0 ok, 1 runtime failure, 2 bad config or usage, 3 BPF unavailable
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bpfpipe: error: {message} (see 'bpfpipe --help')\n")


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
    run.add_argument("--duration", type=float, metavar="SECONDS", help="stop gracefully after this long")
    common(run)
    check = sub.add_parser("check", help="validate a config and print the effective config")
    check.add_argument("config", metavar="CONFIG", nargs="?", help="TOML config (default: $BPFPIPE_CONFIG)")
    common(check)
    return parser


def _cli_overrides(args: argparse.Namespace, file_config: Config | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.log_level:
        out["log_level"] = args.log_level
    if args.metrics_port is not None:
        out["metrics_port"] = args.metrics_port
    for end in ("source", "sink"):
        use = getattr(args, end)
        if use:
            # A different stage does not take the old one's settings.
            current = getattr(file_config, end) if file_config else None
            out[end] = {"use": use} if current and current.use == use else {"use": use, "config": {}}
    return out


def _effective_config(args: argparse.Namespace, path: str | None) -> Config:
    base = load_config(path, environ=os.environ)
    overrides = _cli_overrides(args, base)
    if args.debug:
        overrides["enable_debug"] = True
    return load_config(path, environ=os.environ, overrides=overrides) if overrides else base


async def _run(pipe: Pipeline, duration: float | None) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if pipe.finished.is_set():
                        return
                    if pipe.stopping:
                        log.warning("second signal: aborting", extra={"signal": signum})
                        pipe.abort()
                    else:
                        log.info("stopping: draining in-flight events", extra={"signal": signum})
                        pipe.stop()

        async def stop_after(seconds: float) -> None:
            await trio.sleep(seconds)
            log.info("duration reached: stopping", extra={"seconds": seconds})
            pipe.stop()

        nursery.start_soon(on_signals)
        if duration is not None and math.isfinite(duration):
            nursery.start_soon(stop_after, duration)
        await pipe.finished.wait()
        nursery.cancel_scope.cancel()


def _report(pipe: Pipeline) -> None:
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
    trio.run(_run, pipe, args.duration)
    _report(pipe)
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
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("BPF_DEBUG", "").lower() in {"1", "true", "yes", "on"}
    try:
        return _cmd_run(args) if args.command == "run" else _cmd_check(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        if debug:
            traceback.print_exc()
        error = _find_error(exc)
        if error is not None:
            print(f"bpfpipe: error: {error}", file=sys.stderr)
            return error.exit_code
        hint = "" if debug else " (run with --debug for a traceback)"
        print(f"bpfpipe: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
