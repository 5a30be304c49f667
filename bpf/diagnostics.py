"""What bcc printed, turned into one-line errors for people.

bcc prints compiler diagnostics and the verifier log to fd 2 and raises a bare
``Exception``. :func:`call_bcc` runs a bcc call with fd 2 captured, logs what
bcc printed to the ``bpfpipe.bpf`` logger at debug level, and hands back the
text; the ``*_key_line(s)`` functions pick the compiler's or verifier's own
words out of it for a one-line :class:`BpfLoadError`. The full log stays one
``--log-level debug`` away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.errors import BpfUnavailableError

__all__ = [
    "BpfLoadError",
    "bcc_reason",
    "call_bcc",
    "captured_stderr",
    "compiler_key_line",
    "one_line",
    "verifier_key_lines",
]

_log = logging.getLogger("bpfpipe.bpf")


class BpfLoadError(BpfUnavailableError):
    """A program failed to compile, pass the verifier or attach (exit code 3).

    The message is one line naming the program and quoting the compiler's or
    verifier's own words; the full log goes to the ``bpfpipe.bpf`` logger at
    debug level.
    """

    def __init__(self, program: str, problem: str) -> None:
        self.program = program
        super().__init__(f"BPF program {program!r} {problem}")


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Redirect fd 2 (where bcc and libbpf print) into a buffer for the block;
    the yielded function returns the text once the block has ended."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        text: list[str] = []

        def read() -> str:
            return "".join(text)

        try:
            yield read
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", "replace"))


def call_bcc(call: Callable[[], Any], what: str) -> tuple[Any, Exception | None, str]:
    """Run a bcc call with fd 2 captured: (result, exception or None, what bcc printed)."""
    result, failure = None, None
    with captured_stderr() as captured:
        try:
            result = call()
        except Exception as exc:  # bcc raises bare Exceptions; the caller words the error
            failure = exc
    log = captured()
    if log.strip():
        _log.debug("bcc output while %s:\n%s", what, log)
    return result, failure, log


_VERIFIER_NOISE = re.compile(
    r"^(\d+: |;|R\d+\w*=|from \d+ to \d+|processed \d+ insns|HINT:|bpf: Failed to load program|"
    r"verification time|stack depth|libbpf:|Validating |func#|last_idx|regs=|parent didn't have|"
    r"mark_precise|\.\.\.)"
)


def verifier_key_lines(log: str, keep: int = 2) -> list[str]:
    """The verifier's own words: the last non-state lines before its statistics."""
    lines = [line.strip() for line in log.splitlines()]
    meaningful = [line for line in lines if line and not _VERIFIER_NOISE.match(line)]
    return meaningful[-keep:]


def compiler_key_line(log: str) -> str | None:
    """clang's first ``error:`` line (and how many more there are), if any."""
    errors = [line.strip() for line in log.splitlines() if ": error: " in line]
    if errors:
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return errors[0] + more
    others = [line.strip() for line in log.splitlines() if "error" in line.lower()]
    return others[0] if others else None


def one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def bcc_reason(failure: Exception) -> str:
    """The errno text at the end of bcc's "Failed to ...: <strerror>" messages."""
    return one_line(str(failure).rsplit(": ", 1)[-1])
