"""Running the CLI as a user does, for the e2e tests: one-shot, or spawned to signal it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

BPFPIPE = [sys.executable, "-m", "pipeline.cli"]
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in {"BPF_LOG_LEVEL", "METRICS_PORT", "HEALTH_CHECK_PORT", "ADMIN_PORT", "BPF_DEBUG"}
}
NO_SERVERS = {"METRICS_PORT": "0", "HEALTH_CHECK_PORT": "0", "ADMIN_PORT": "0"}
"""``bpfpipe run`` in a test starts no HTTP server unless the test asks for one (by
passing these variables, or ``free_port()`` values, itself): tests never fight over
the default ports."""


def _env(args: tuple[str, ...], env: dict[str, str | None] | None) -> dict[str, str]:
    """``env`` over the defaults; a None value unsets the variable."""
    defaults = NO_SERVERS if args[:1] == ("run",) else {}
    merged = {**CLEAN_ENV, **defaults, **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def bpfpipe(
    *args: str, env: dict[str, str | None] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BPFPIPE, *args], capture_output=True, text=True, timeout=timeout, env=_env(args, env)
    )


def spawn(*args: str, env: dict[str, str | None] | None = None) -> subprocess.Popen[str]:
    """Start the CLI as a terminal would: its own session, SIGINT at its default (a
    background job of a non-interactive shell would start with SIGINT ignored)."""
    return subprocess.Popen(
        [*BPFPIPE, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(args, env),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"bpfpipe: error: {text}"], proc.stderr
    assert "Traceback" not in proc.stderr


def own_lines(stderr: str, *, at_most: int = 2) -> list[str]:
    """bpfpipe's own lines on stderr (``bpfpipe: ...``), after checking that every other
    line is a log line (logfmt, ``ts=...``), that there are at most ``at_most`` of them
    and no traceback."""
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    lines = stderr.strip().splitlines()
    own = [line for line in lines if line.startswith("bpfpipe: ")]
    assert all(line.startswith("ts=") for line in lines if line not in own), stderr
    assert len(own) <= at_most, stderr
    return own


def assert_accounts_balance(stderr: str) -> dict[str, int]:
    """The final ``pipeline finished`` line: pending=0 and outcomes summing to produced."""
    finished = [line for line in stderr.splitlines() if 'msg="pipeline finished"' in line]
    assert len(finished) == 1, stderr
    fields = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)(?=\s|$)", finished[0])}
    assert fields["pending"] == 0, finished[0]
    outcomes = sum(v for k, v in fields.items() if k.startswith("outcome_"))
    assert outcomes == fields["produced"], finished[0]
    return fields


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_module(directory: Path, name: str, source: str) -> Path:
    """A plug-in module ``name`` in ``directory`` (put it on PYTHONPATH)."""
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path
