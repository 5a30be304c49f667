"""Load each function of a compiled program through the verifier, attach it, and undo it.

Attach conventions (no per-program Python tables to keep in sync):

- ``TRACEPOINT_PROBE(category, event)`` functions attach to that tracepoint;
- a function named like the program (``int xdp_firewall(struct xdp_md *)``)
  is an XDP program, attached to ``options["interface"]`` in
  ``options["mode"]`` (one of :data:`XDP_MODES`, default ``skb``), never
  replacing another tool's XDP program;
- any other non-static function is an error.

Every attachment comes with a detacher; the caller keeps both lists, so what
was attached before a failure can still be undone. bcc wants bytes for every
name (a str warns, and warnings are errors in our tests), so names are encoded
at each call. bcc is imported only when a function here is called.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .diagnostics import BpfLoadError, bcc_reason, call_bcc, captured_stderr, one_line, verifier_key_lines

__all__ = [
    "XDP_MODES",
    "Attachment",
    "Detacher",
    "attach_all",
    "function_names",
]

XDP_MODES = {"skb": "SKB_MODE", "driver": "DRV_MODE"}
"""``options["mode"]`` of an XDP program -> the name of bcc's ``XDP_FLAGS_*`` flag."""

Detacher = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Attachment:
    """One loaded function and where it is attached."""

    function: str
    prog_id: int
    attach_point: str  # "tracepoint:sched:sched_process_exec", "xdp:eth0:skb"


def function_names(bpf: Any) -> list[str]:
    """The non-static functions of a compiled module, in source order."""
    from bcc import lib

    return [lib.bpf_function_name(bpf.module, i).decode() for i in range(lib.bpf_num_functions(bpf.module))]


def attach_all(
    bpf: Any,
    program: str,
    functions: list[str],
    options: Mapping[str, Any],
    attachments: list[Attachment],
    detachers: list[Detacher],
) -> None:
    """Load and attach every function by convention (``options`` already validated)."""
    from bcc import BPF

    for function in functions:
        if function.startswith("tracepoint__"):
            fn = _load_function(bpf, program, function, BPF.TRACEPOINT)
            category, _, event = function.removeprefix("tracepoint__").partition("__")
            point = f"{category}:{event}"
            _, failure, _ = call_bcc(
                functools.partial(bpf.attach_tracepoint, tp=point.encode(), fn_name=function.encode()),
                f"attaching {program} to {point}",
            )
            if failure is not None:
                raise BpfLoadError(program, f"could not attach to tracepoint {point}: {bcc_reason(failure)}")
            detachers.append(_tracepoint_detacher(bpf, point))
            attachments.append(Attachment(function, _prog_id(fn.fd), f"tracepoint:{point}"))
        elif function == program:
            fn = _load_function(bpf, program, function, BPF.XDP)
            interface = str(options["interface"])
            mode = options.get("mode", "skb")
            flags = getattr(BPF, f"XDP_FLAGS_{XDP_MODES[mode]}")
            # UPDATE_IF_NOEXIST: never replace another tool's XDP program.
            _, failure, _ = call_bcc(
                functools.partial(
                    BPF.attach_xdp, interface.encode(), fn, flags | BPF.XDP_FLAGS_UPDATE_IF_NOEXIST
                ),
                f"attaching {program} to {interface}",
            )
            if failure is not None:
                reason = bcc_reason(failure)
                if reason == os.strerror(errno.EBUSY):
                    reason += " (another XDP program is attached; remove it first)"
                raise BpfLoadError(program, f"could not attach XDP ({mode} mode) to {interface!r}: {reason}")
            detachers.append(_xdp_detacher(interface, flags))
            attachments.append(Attachment(function, _prog_id(fn.fd), f"xdp:{interface}:{mode}"))
        else:
            raise BpfLoadError(
                program,
                f"defines function {function!r} that matches no attach convention "
                f"(TRACEPOINT_PROBE, or an XDP function named {program!r}); make helpers static",
            )


def _load_function(bpf: Any, program: str, function: str, prog_type: int) -> Any:
    fn, failure, log = call_bcc(
        lambda: bpf.load_func(function.encode(), prog_type), f"loading {program}/{function}"
    )
    if failure is None:
        return fn
    reason = bcc_reason(failure)
    words = "; ".join(f'"{line}"' for line in verifier_key_lines(log)) or one_line(str(failure))
    raise BpfLoadError(
        program,
        f"was rejected by the kernel verifier ({function}: {reason}): {words}"
        "; the full verifier log is logged with --log-level debug",
    )


def _prog_id(fd: int) -> int:
    """The kernel's id for a program fd (as shown by bpftool), from /proc/self/fdinfo."""
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tracepoint_detacher(bpf: Any, point: str) -> Detacher:
    def detach() -> None:
        bpf.detach_tracepoint(tp=point.encode())

    return detach


def _xdp_detacher(interface: str, flags: int) -> Detacher:
    def detach() -> None:
        from bcc import BPF

        try:
            with captured_stderr():
                BPF.remove_xdp(interface.encode(), flags)
        except Exception:
            if _interface_exists(interface):
                raise
            # The interface is gone, and its XDP program with it.

    return detach


def _interface_exists(interface: str) -> bool:
    try:
        socket.if_nametoindex(interface)
    except OSError:
        return False
    return True
