"""Load each function of a compiled program through the verifier, attach it, and undo it.

Attach conventions (no per-program Python tables to keep in sync):

- ``TRACEPOINT_PROBE(category, event)`` functions attach to that tracepoint;
- a function named like the program (``int xdp_firewall(struct xdp_md *)``)
  is an XDP program, attached to ``options["interface"]`` in
  ``options["mode"]`` (one of :data:`XDP_MODES`, default ``skb``), never
  replacing another tool's XDP program;
- any other non-static function is an error.

A crashed (SIGKILLed) bpfpipe leaves its XDP program attached: the kernel
keeps it alive through the interface, not through the dead process. Before
attaching, :func:`attached_xdp` asks iproute2 what is on the interface and
:func:`stale_xdp_problem` decides, from facts only, whether it is *our own
stale* program: same function name, same tag as the program just loaded
(the tag is a hash of the verified instructions, so same source and options),
and no process holding an fd to it (so no bpfpipe is running it). Only then is
it detached, with one warning; anything else stops the attach with one line
naming the program and the command that removes it. The attach that follows
still says UPDATE_IF_NOEXIST, so a program another tool attaches in between
makes it fail rather than be replaced.

Every attachment comes with a detacher; the caller keeps both lists, so what
was attached before a failure can still be undone. bcc wants bytes for every
name (a str warns, and warnings are errors in our tests), so names are encoded
at each call. bcc is imported only when a function here is called.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .diagnostics import BpfLoadError, bcc_reason, call_bcc, captured_stderr, one_line, verifier_key_lines

__all__ = [
    "XDP_MODES",
    "AttachedXdp",
    "Attachment",
    "Detacher",
    "attach_all",
    "attached_xdp",
    "function_names",
    "load_all",
    "stale_xdp_problem",
]

XDP_MODES = {"skb": "SKB_MODE", "driver": "DRV_MODE"}
"""``options["mode"]`` of an XDP program -> the name of bcc's ``XDP_FLAGS_*`` flag."""

Detacher = Callable[[], None]

_XDP_ATTACHED_MODES = {1: "driver", 2: "skb", 3: "hw"}
"""``IFLA_XDP_ATTACHED`` values (``XDP_ATTACHED_*``, as ``ip -j link`` prints them) -> our mode names."""

_XDP_OFF_WORDS = {"skb": "xdpgeneric", "driver": "xdpdrv", "hw": "xdpoffload"}
"""Mode -> the word `ip link set ... off` and `bpftool net detach` take (plain `xdp` misses skb mode)."""

_BPF_OBJ_NAME_LEN = 16  # the kernel keeps 15 characters of a program's name

_log = logging.getLogger("bpfpipe.bpf")


@dataclass(frozen=True, slots=True)
class Attachment:
    """One loaded function and where it is attached."""

    function: str
    prog_id: int
    attach_point: str  # "tracepoint:sched:sched_process_exec", "xdp:eth0:skb"


@dataclass(frozen=True, slots=True)
class AttachedXdp:
    """An XDP program attached to an interface, as iproute2 reports it."""

    prog_id: int
    name: str  # "" when this iproute2 cannot say (built without libbpf)
    tag: str
    mode: str  # "skb", "driver" or "hw"

    def describe(self) -> str:
        return f"prog id {self.prog_id}, name {self.name or '?'!r}, tag {self.tag or '?'}, {self.mode} mode"


def function_names(bpf: Any) -> list[str]:
    """The non-static functions of a compiled module, in source order."""
    from bcc import lib

    return [lib.bpf_function_name(bpf.module, i).decode() for i in range(lib.bpf_num_functions(bpf.module))]


def load_all(bpf: Any, program: str, functions: list[str]) -> None:
    """Load every function through the verifier, attaching nothing (the *load programs*
    startup step); :func:`attach_all` then finds them loaded (bcc keeps them by name)."""
    from bcc import BPF

    for function in functions:
        if function.startswith("tracepoint__"):
            _load_function(bpf, program, function, BPF.TRACEPOINT)
        elif function == program:
            _load_function(bpf, program, function, BPF.XDP)
        # Anything else is attach_all's error, with its message.


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
            flags = _xdp_mode_flags(mode)
            _replace_stale_xdp(program, function, interface, mode, fn.fd)
            # UPDATE_IF_NOEXIST: never replace another tool's XDP program.
            _, failure, _ = call_bcc(
                functools.partial(
                    BPF.attach_xdp, interface.encode(), fn, flags | BPF.XDP_FLAGS_UPDATE_IF_NOEXIST
                ),
                f"attaching {program} to {interface}",
            )
            if failure is not None:
                reason = bcc_reason(failure)
                if reason in (os.strerror(errno.EBUSY), os.strerror(errno.EEXIST)):
                    reason += (
                        f" (another XDP program was attached meanwhile; see `ip link show dev {interface}`)"
                    )
                raise BpfLoadError(program, f"could not attach XDP ({mode} mode) to {interface!r}: {reason}")
            detachers.append(_xdp_detacher(interface, flags))
            attachments.append(Attachment(function, _prog_id(fn.fd), f"xdp:{interface}:{mode}"))
        else:
            raise BpfLoadError(
                program,
                f"defines function {function!r} that matches no attach convention "
                f"(TRACEPOINT_PROBE, or an XDP function named {program!r}); make helpers static",
            )


def attached_xdp(interface: str) -> list[AttachedXdp]:
    """The XDP programs attached to ``interface`` (``ip -j link show``), one per mode."""
    try:
        done = subprocess.run(
            ["ip", "-j", "link", "show", "dev", interface], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot ask iproute2 what is attached to {interface!r}: {exc}") from None
    if done.returncode != 0:
        raise RuntimeError(f"`ip link show dev {interface}` failed: {one_line(done.stderr)}")
    found: dict[int, AttachedXdp] = {}
    for link in json.loads(done.stdout or "[]"):
        xdp = link.get("xdp") or {}
        entries = xdp.get("attached") or ([xdp] if "prog" in xdp else [])
        for entry in entries:
            prog = entry.get("prog") or {}
            if "id" not in prog:
                continue
            mode = _XDP_ATTACHED_MODES.get(int(entry.get("mode", 0)), f"mode {entry.get('mode')}")
            found[int(prog["id"])] = AttachedXdp(
                int(prog["id"]), str(prog.get("name", "")), str(prog.get("tag", "")), mode
            )
    return list(found.values())


def stale_xdp_problem(
    attached: AttachedXdp, *, interface: str, function: str, tag: str, holders: Iterable[int]
) -> str | None:
    """None if ``attached`` is our own stale program (safe to detach), else why not, for people.

    Ours: the same (15-character) name and the same tag as the program we just
    loaded, in a mode we can detach, and no process holding it open.
    """
    name_matches = attached.name == function[: _BPF_OBJ_NAME_LEN - 1]
    ours = name_matches and attached.tag == tag
    pids = sorted(holders)
    if ours and pids:
        return (
            f"this program is already attached ({attached.describe()}) and held open by running "
            f"process{'es' if len(pids) > 1 else ''} {', '.join(map(str, pids))}; stop that bpfpipe first"
        )
    if ours and attached.mode in XDP_MODES:
        return None
    if not attached.name:
        why = "iproute2 does not say its name, so not replacing it"
    elif not name_matches:
        why = "not bpfpipe's, so not replacing it"
    elif not ours:
        why = "same name but a different tag (another bpfpipe build or other options), so not replacing it"
    else:
        why = "attached in a mode bpfpipe does not use, so not replacing it"
    word = _XDP_OFF_WORDS.get(attached.mode, "xdp")
    return (
        f"another XDP program is attached ({attached.describe()}): {why}; if it should go, remove it with "
        f"`ip link set dev {interface} {word} off` or `bpftool net detach {word} dev {interface}`"
    )


def _replace_stale_xdp(program: str, function: str, interface: str, mode: str, fd: int) -> None:
    """Detach our own stale XDP program from ``interface``; raise if something else is there."""
    try:
        attached = attached_xdp(interface)
    except RuntimeError as exc:
        raise BpfLoadError(program, f"could not attach XDP ({mode} mode) to {interface!r}: {exc}") from None
    if not attached:
        return
    tag = _fdinfo(fd).get("prog_tag", "")
    for stale in attached:
        problem = stale_xdp_problem(
            stale, interface=interface, function=function, tag=tag, holders=_prog_holders(stale.prog_id)
        )
        if problem is not None:
            raise BpfLoadError(program, f"could not attach XDP ({mode} mode) to {interface!r}: {problem}")
    for stale in attached:
        _log.warning(
            "replacing stale XDP program",
            extra={
                "interface": interface,
                "prog_id": stale.prog_id,
                "xdp_mode": stale.mode,
                "why_ours": (
                    f"name {stale.name} and tag {stale.tag} match the program just loaded, "
                    "and no process holds it (left by a bpfpipe that did not stop cleanly)"
                ),
            },
        )
        _, failure, _ = call_bcc(
            functools.partial(_remove_xdp, interface, _xdp_mode_flags(stale.mode)),
            f"detaching stale XDP program {stale.prog_id} from {interface}",
        )
        if failure is not None:
            raise BpfLoadError(
                program,
                f"could not detach its stale XDP program (prog id {stale.prog_id}) from {interface!r}: "
                f"{bcc_reason(failure)}",
            )


def _remove_xdp(interface: str, flags: int) -> None:
    from bcc import BPF

    BPF.remove_xdp(interface.encode(), flags)


def _xdp_mode_flags(mode: str) -> int:
    from bcc import BPF

    return int(getattr(BPF, f"XDP_FLAGS_{XDP_MODES[mode]}"))


def _prog_holders(prog_id: int) -> set[int]:
    """Pids of the processes holding an fd to BPF program ``prog_id`` (a running bpfpipe does)."""
    holders: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != "anon_inode:bpf-prog":
                    continue
                if _fdinfo_path(proc / "fdinfo" / fd.name).get("prog_id") == str(prog_id):
                    holders.add(int(proc.name))
                    break
            except OSError:
                continue
    return holders


def _fdinfo(fd: int) -> dict[str, str]:
    try:
        return _fdinfo_path(Path(f"/proc/self/fdinfo/{fd}"))
    except OSError:
        return {}


def _fdinfo_path(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


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
        return int(_fdinfo(fd).get("prog_id", "0"))
    except ValueError:
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
