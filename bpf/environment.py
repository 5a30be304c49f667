"""Can this machine and user load bpfpipe's BPF programs? Say exactly what is missing.

The checks run in the order a person fixes them (privilege, bcc, kernel
headers, tracefs) and stop at the first failure, so the one-line error names
one concrete problem, how to fix it, and how to try the pipeline without a
kernel. Every input (paths, the bcc import) is injectable so the messages can
be tested without root.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import BpfUnavailableError

__all__ = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYS_ADMIN",
    "check_bpf_environment",
    "find_missing_prerequisite",
]

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
_REQUIRED_CAPS = {CAP_BPF: "CAP_BPF", CAP_PERFMON: "CAP_PERFMON"}
"""Loading programs and maps needs CAP_BPF; attaching tracepoints (perf events) and
reading kernel time need CAP_PERFMON. CAP_SYS_ADMIN implies both (kernels before
5.8 know only it). XDP also needs CAP_NET_ADMIN, checked when it attaches. Checked
here: bcc 0.26 loads and attaches the exec program with exactly CAP_BPF + CAP_PERFMON
+ CAP_NET_ADMIN (the systemd unit in deploy/ grants those)."""
_NEEDS = "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"

TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
_FIX = "run 'sudo make setup'"
_TRY = "or try the pipeline without a kernel: --source synthetic"


def _import_bcc() -> object:
    return importlib.import_module("bcc")


def _effective_caps(proc_status: Path) -> int | None:
    """CapEff from /proc/<pid>/status, or None if unreadable."""
    try:
        for line in proc_status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def find_missing_prerequisite(
    *,
    euid: int | None = None,
    proc_status: Path = Path("/proc/self/status"),
    import_bcc: Callable[[], object] = _import_bcc,
    release: str | None = None,
    modules_dir: Path = Path("/lib/modules"),
    tracefs_dirs: Sequence[Path] = TRACEFS_DIRS,
) -> str | None:
    """The first missing prerequisite as a one-line message, or None if BPF can load."""
    euid = os.geteuid() if euid is None else euid
    caps = _effective_caps(proc_status)
    missing_caps = [name for bit, name in _REQUIRED_CAPS.items() if caps is None or not caps >> bit & 1]
    if missing_caps and caps is not None and caps >> CAP_SYS_ADMIN & 1:
        missing_caps = []
    if missing_caps:
        if euid != 0:
            return (
                f"BPF unavailable: not running as root (loading BPF programs needs {_NEEDS}); "
                f"run as root, e.g. 'sudo bpfpipe ...', or grant those capabilities, {_TRY}"
            )
        return (
            f"BPF unavailable: running as root without {'+'.join(missing_caps)} (a restricted "
            f"container or capability bounding set?); grant {_NEEDS} (plus CAP_NET_ADMIN for XDP), "
            f"e.g. the capabilities in deploy/bpfpipe.service, {_TRY}"
        )

    try:
        import_bcc()
    except ImportError as exc:
        return f"BPF unavailable: bcc is not importable ({exc}); {_FIX} to install and link it, {_TRY}"

    release = os.uname().release if release is None else release
    build = modules_dir / release / "build"
    if not (build / "include").is_dir():
        return f"BPF unavailable: no kernel headers at {build}; {_FIX} to install and link them, {_TRY}"

    if not any((tracefs / "events").is_dir() for tracefs in tracefs_dirs):
        where = " or ".join(str(path) for path in tracefs_dirs)
        return f"BPF unavailable: tracefs is not mounted at {where}; {_FIX} to mount it, {_TRY}"
    return None


def check_bpf_environment(
    *,
    euid: int | None = None,
    proc_status: Path = Path("/proc/self/status"),
    import_bcc: Callable[[], object] = _import_bcc,
    release: str | None = None,
    modules_dir: Path = Path("/lib/modules"),
    tracefs_dirs: Sequence[Path] = TRACEFS_DIRS,
) -> None:
    """Raise :class:`BpfUnavailableError` (exit code 3) naming what is missing."""
    problem = find_missing_prerequisite(
        euid=euid,
        proc_status=proc_status,
        import_bcc=import_bcc,
        release=release,
        modules_dir=modules_dir,
        tracefs_dirs=tracefs_dirs,
    )
    if problem is not None:
        raise BpfUnavailableError(problem)
