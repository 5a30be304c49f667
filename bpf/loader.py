"""Compile, verify and attach bpfpipe's BPF programs; derive event dtypes from C.

Theory of operation
-------------------
A program ``<name>`` is ``<name>.bpf.c`` in this package's directory (so the
programs ship with the package). :func:`load_program` checks the machine,
sizes the maps, compiles the program with bcc, loads every function through
the verifier, attaches it, and returns a :class:`LoadedProgram` that owns all
of it until :meth:`LoadedProgram.close`.

Attach conventions (no per-program Python tables to keep in sync):

- ``TRACEPOINT_PROBE(category, event)`` functions attach to that tracepoint;
- a function named like the program (``int xdp_firewall(struct xdp_md *)``)
  is an XDP program, attached to ``options["interface"]``.

One schema source: each program's header lists its events as
``BPFPIPE_EVENTS(X)`` entries ``X(type id, struct name, event name)``. The
loader appends one hidden array map per entry to the compiled text, whose leaf
type is the event struct and whose ``max_entries`` is the type id; bcc then
describes clang's layout of each struct, and that description becomes the
numpy dtype. Nothing in Python restates a field, offset or id.

Why the source is inlined: bcc rewrites map method calls (``map.lookup()``)
only in the main file, and generates ``TRACEPOINT_PROBE`` argument structs only
there, so the loader splices quoted ``#include`` files found next to the
program into one text, with ``#line`` markers so compiler errors still name
the real file and line (re-synced after each ``TRACEPOINT_PROBE``, before
which bcc inserts the multi-line argument struct).

bcc wants bytes for every name (a str warns, and warnings are errors in our
tests), so names are encoded at each call.

Why stderr is captured: bcc prints compiler diagnostics and the verifier log
to fd 2 and raises a bare ``Exception``; the loader keeps that text, logs it
at debug level and turns its key lines into one-line :class:`BpfLoadError`\\ s.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import ipaddress
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BpfUnavailableError, ConfigError

from .environment import check_bpf_environment

__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_RING_BUFFER_PAGES",
    "MAX_MAP_SIZE",
    "MAX_RING_BUFFER_PAGES",
    "MIN_MAP_SIZE",
    "PROGRAM_DIR",
    "STAT_NAMES",
    "Attachment",
    "BpfLoadError",
    "LoadedProgram",
    "LoadgenProgram",
    "XdpFirewallProgram",
    "available_programs",
    "clamp_map_size",
    "load_program",
    "ring_buffer_pages",
]

_log = logging.getLogger("bpfpipe.bpf")

PROGRAM_DIR = Path(__file__).resolve().parent
MAX_RING_BUFFER_PAGES = 1 << 18  # 1 GiB of 4 KiB pages
MIN_MAP_SIZE = 128
MAX_MAP_SIZE = 1 << 22

_SCHEMA_PREFIX = "__schema_"
_HEADER_SCHEMA = "__bpfpipe_header"
_HEADER_STRUCT = "bpfpipe_hdr"
_HEADER_MEMBER = "hdr"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_TRACEPOINT_PROBE = re.compile(r"^\s*TRACEPOINT_PROBE\s*\(.*\)")


class BpfLoadError(BpfUnavailableError):
    """A program failed to compile, pass the verifier or attach (exit code 3).

    The message is one line naming the program and quoting the compiler's or
    verifier's own words; the full log goes to the ``bpfpipe.bpf`` logger at
    debug level.
    """

    def __init__(self, program: str, problem: str) -> None:
        self.program = program
        super().__init__(f"BPF program {program!r} {problem}")


def _parse_enum(header: Path, prefix: str) -> dict[int, str]:
    """``PREFIX_NAME = value`` entries of a C enum, as {value: "name"} (lowercase)."""
    entries = re.findall(rf"\b{prefix}_(\w+)\s*=\s*(\d+)", header.read_text())
    return {int(value): name.lower() for name, value in entries if not name.startswith("_")}


def _parse_define(header: Path, name: str) -> int:
    """The integer value of ``#define NAME <digits>`` in a header."""
    match = re.search(rf"#define\s+{name}\s+(\d+)", header.read_text())
    if match is None:
        raise RuntimeError(f"{header} lacks '#define {name} <number>'")
    return int(match.group(1))


# Constants Python needs, read from the headers that define them (one source).
_STATS = _parse_enum(PROGRAM_DIR / "bpfpipe.h", "STAT")
STAT_NAMES: tuple[str, ...] = tuple(_STATS[index] for index in sorted(_STATS))
"""Per-CPU counter names in index order, from ``enum bpfpipe_stat`` in bpfpipe.h."""
DEFAULT_RING_BUFFER_PAGES = _parse_define(PROGRAM_DIR / "bpfpipe.h", "BPFPIPE_RINGBUF_PAGES")
DEFAULT_MAP_SIZE = _parse_define(PROGRAM_DIR / "bpfpipe.h", "BPFPIPE_MAP_SIZE")
_LATENCY_BUCKETS = _parse_enum(PROGRAM_DIR / "xdp_firewall.h", "LAT")
_LOADGEN_MAX = _parse_define(PROGRAM_DIR / "loadgen.h", "LOADGEN_MAX_EVENTS_PER_CALL")


def available_programs(source_dir: Path = PROGRAM_DIR) -> list[str]:
    return sorted(path.name.removesuffix(".bpf.c") for path in source_dir.glob("*.bpf.c"))


# -- sizes -------------------------------------------------------------------


def ring_buffer_pages(size_bytes: int, page_size: int) -> int:
    """Pages for a ring buffer of at least ``size_bytes``: a power of two, >= 1, capped."""
    if size_bytes <= 0:
        raise ValueError(f"ring buffer size must be positive, got {size_bytes}")
    pages = max(1, -(-size_bytes // page_size))
    return min(1 << (pages - 1).bit_length(), MAX_RING_BUFFER_PAGES)


def clamp_map_size(entries: int) -> int:
    """Entries for hash maps: within [MIN_MAP_SIZE, MAX_MAP_SIZE]."""
    if entries <= 0:
        raise ValueError(f"map size must be positive, got {entries}")
    return min(max(entries, MIN_MAP_SIZE), MAX_MAP_SIZE)


# -- source ------------------------------------------------------------------


def _inline_includes(path: Path, search: list[Path], depth: int = 0) -> str:
    """``path``'s text with quoted includes found in ``search`` spliced in (see module doc)."""
    if depth > 16:
        raise ValueError(f"#include nesting deeper than 16 at {path}")
    out = [f'#line 1 "{path}"']
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        found = None
        if match:
            found = next(
                (d / match.group(1) for d in [path.parent, *search] if (d / match.group(1)).is_file()),
                None,
            )
        if found is None:
            out.append(line)
            if _TRACEPOINT_PROBE.match(line):
                # bcc inserts the multi-line argument struct before this line; re-sync.
                out.append(f'#line {number + 1} "{path}"')
            continue
        out.append(_inline_includes(found, search, depth + 1))
        out.append(f'#line {number + 1} "{path}"')
    return "\n".join(out)


_SCHEMA_TEXT = f"""
/* --- appended by bpf/loader.py: layout probes for the event dtypes --- */
BPF_ARRAY({_HEADER_SCHEMA}, struct {_HEADER_STRUCT}, 1);
#ifdef BPFPIPE_EVENTS
#define __BPFPIPE_SCHEMA(type_id, struct_name, event_name) \\
    BPF_ARRAY({_SCHEMA_PREFIX}##event_name, struct struct_name, type_id);
BPFPIPE_EVENTS(__BPFPIPE_SCHEMA)
#endif
"""


# -- bcc diagnostics -----------------------------------------------------------


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Redirect fd 2 (where bcc and libbpf print) into a buffer for the block."""
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


_VERIFIER_NOISE = re.compile(
    r"^(\d+: |;|R\d+\w*=|from \d+ to \d+|processed \d+ insns|HINT:|bpf: Failed to load program|"
    r"verification time|stack depth|libbpf:|Validating |func#|last_idx|regs=|parent didn't have|"
    r"mark_precise|\.\.\.)"
)


def _verifier_key_lines(log: str, keep: int = 2) -> list[str]:
    """The verifier's own words: the last non-state lines before its statistics."""
    lines = [line.strip() for line in log.splitlines()]
    meaningful = [line for line in lines if line and not _VERIFIER_NOISE.match(line)]
    return meaningful[-keep:]


def _compiler_key_line(log: str) -> str | None:
    errors = [line.strip() for line in log.splitlines() if ": error: " in line]
    if errors:
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return errors[0] + more
    others = [line.strip() for line in log.splitlines() if "error" in line.lower()]
    return others[0] if others else None


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- dtypes --------------------------------------------------------------------


def _numpy_format(ctype: Any) -> Any:
    if issubclass(ctype, ctypes.Array):
        if ctype._type_ is ctypes.c_char:
            return f"S{ctype._length_}"
        return (_numpy_format(ctype._type_), (ctype._length_,))
    if issubclass(ctype, ctypes.Union):
        return f"V{ctypes.sizeof(ctype)}"
    if ctype is ctypes.c_char:
        return "S1"
    return np.dtype(ctype).newbyteorder("<")


def _flatten(cls: Any, base: int, prefix: str, fields: list[tuple[str, Any, int]], where: str) -> None:
    for spec in cls._fields_:
        name, ctype = spec[0], spec[1]
        if len(spec) > 2:
            raise ValueError(f"{where}: bit-field {name!r} has no numpy equivalent")
        if name.startswith("__"):  # bcc's __pad_N alignment fillers and explicit padding
            continue
        offset = base + getattr(cls, name).offset
        if issubclass(ctype, ctypes.Structure):
            is_header = name == _HEADER_MEMBER and ctype.__name__ == _HEADER_STRUCT and offset == 0
            _flatten(ctype, offset, "" if is_header else f"{prefix}{name}_", fields, where)
            continue
        fields.append((prefix + name, _numpy_format(ctype), offset))


def dtype_from_ctypes(cls: Any, where: str) -> np.dtype[Any]:
    """A flat numpy dtype with clang's offsets and size.

    Nested structs become ``member_field`` columns, except the leading
    ``struct bpfpipe_hdr hdr`` whose fields keep their names (``type``,
    ``cpu``, ``rate``, ``ts_ns``) in every event. ``char[n]`` becomes ``S<n>``.
    """
    fields: list[tuple[str, Any, int]] = []
    _flatten(cls, 0, "", fields, where)
    names = [name for name, _, _ in fields]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: flattened field names collide: {', '.join(duplicates)}")
    return np.dtype(
        {
            "names": names,
            "formats": [fmt for _, fmt, _ in fields],
            "offsets": [offset for _, _, offset in fields],
            "itemsize": ctypes.sizeof(cls),
        }
    )


def _event_schema(bpf: Any, program: str) -> tuple[np.dtype[Any], dict[int, np.dtype[Any]], dict[int, str]]:
    from bcc import lib

    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]

    header_leaf = bpf[_HEADER_SCHEMA.encode()].Leaf
    header = dtype_from_ctypes(header_leaf, f"struct {_HEADER_STRUCT}")
    types: dict[int, np.dtype[Any]] = {}
    names: dict[int, str] = {}
    for index in range(lib.bpf_num_tables(bpf.module)):
        table = lib.bpf_table_name(bpf.module, index).decode()
        if not table.startswith(_SCHEMA_PREFIX):
            continue
        event = table.removeprefix(_SCHEMA_PREFIX)
        type_id = int(lib.bpf_table_max_entries_id(bpf.module, lib.bpf_table_id(bpf.module, table.encode())))
        leaf = bpf[table.encode()].Leaf
        where = f"event {event!r} (struct {leaf.__name__})"
        first = leaf._fields_[0] if leaf._fields_ else None
        if first is None or first[0] != _HEADER_MEMBER or first[1].__name__ != _HEADER_STRUCT:
            raise BpfLoadError(program, f"has {where} that does not begin with 'struct bpfpipe_hdr hdr'")
        if type_id in types:
            raise BpfLoadError(program, f"declares type id {type_id} twice ({names[type_id]!r}, {event!r})")
        try:
            types[type_id] = dtype_from_ctypes(leaf, where)
        except ValueError as exc:
            raise BpfLoadError(program, f"has an event numpy cannot describe: {exc}") from None
        names[type_id] = event
    return header, types, names


# -- the loaded program ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """One loaded function and where it is attached."""

    function: str
    prog_id: int
    attach_point: str  # "tracepoint:sched:sched_process_exec", "xdp:eth0:skb"


def _prog_id(fd: int) -> int:
    """The kernel's id for a program fd (as shown by bpftool), from /proc/self/fdinfo."""
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# Per program: map name -> the timestamp field of its value (None: the value is the timestamp).
GROWING_MAPS: dict[str, dict[str, str | None]] = {
    "exec": {"exec_procs": "start_ns"},
    "xdp_firewall": {"rate_limit_state": None},
}


class LoadedProgram:
    """A compiled, verified, attached BPF program and its maps, until :meth:`close`.

    ``event_types`` maps each type id to the dtype of its record (the C struct,
    flattened; see :func:`dtype_from_ctypes`); ``header_dtype`` is the common
    header every record starts with. Use as a context manager, or call
    :meth:`close` (idempotent) to detach and free everything.
    """

    def __init__(
        self,
        *,
        name: str,
        bpf: Any,
        ring_size_bytes: int,
        map_size: int,
        attachments: list[Attachment],
        detachers: list[Callable[[], None]],
        header_dtype: np.dtype[Any],
        event_types: dict[int, np.dtype[Any]],
        event_names: dict[int, str],
        options: Mapping[str, Any],
    ) -> None:
        self.name = name
        self.bpf = bpf
        self.ring_size_bytes = ring_size_bytes
        self.map_size = map_size
        self.attachments = tuple(attachments)
        self.header_dtype = header_dtype
        self.event_types = event_types
        self.event_names = event_names
        self.options = dict(options)
        self.ring_map_fd: int = bpf[b"events"].map_fd
        self._detachers = detachers
        self._detached = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.attachments)} attachments"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def detached(self) -> bool:
        return self._detached

    def _table(self, name: str) -> Any:
        if self._closed:
            raise RuntimeError(f"BPF program {self.name!r} is closed")
        return self.bpf[name.encode()]

    # stats

    def kernel_stats_per_cpu(self) -> list[dict[str, int]]:
        """``bpfpipe_stats`` per possible CPU. Counters are read one by one, so the
        conservation law (events == sampled_out + lost_reserve + emitted) holds
        exactly only when no event is in flight."""
        table = self._table("bpfpipe_stats")
        columns = {name: list(table.getvalue(table.Key(index))) for index, name in enumerate(STAT_NAMES)}
        cpus = len(next(iter(columns.values())))
        return [{name: int(values[cpu]) for name, values in columns.items()} for cpu in range(cpus)]

    def kernel_stats(self) -> dict[str, int]:
        """``bpfpipe_stats`` summed over CPUs (see :meth:`kernel_stats_per_cpu`)."""
        totals = dict.fromkeys(STAT_NAMES, 0)
        for cpu in self.kernel_stats_per_cpu():
            for name, value in cpu.items():
                totals[name] += value
        return totals

    def set_sample_rate(self, rate: int) -> None:
        """Keep 1 in ``rate`` events in the kernel (1 keeps all); kept events carry ``rate``."""
        if not isinstance(rate, int) or rate < 1 or rate > 0xFFFFFFFF:
            raise ValueError(f"sample rate must be an integer in 1..2**32-1, got {rate!r}")
        table = self._table("bpfpipe_rate")
        table[table.Key(0)] = table.Leaf(rate)

    def sample_rate(self) -> int:
        table = self._table("bpfpipe_rate")
        return max(1, int(table[table.Key(0)].value))

    # maps that grow with the workload (the resource enforcer bounds them)

    def growing_maps(self) -> dict[str, int]:
        """Entry counts of this program's maps that grow with the workload."""
        return {name: len(self._table(name)) for name in GROWING_MAPS.get(self.name, {})}

    def evict_oldest(self, map_name: str, keep: int) -> int:
        """Delete the entries with the oldest timestamps until at most ``keep`` remain.

        Eviction rule: every growing map has a u64 nanosecond timestamp per entry
        (``exec_procs``: the process's fork/exec time — entries whose exit was never
        seen are the oldest; ``rate_limit_state``: the source's last GCRA arrival
        time — the least recently active sources). The smallest go first. Returns
        how many entries were deleted."""
        field = GROWING_MAPS.get(self.name, {}).get(map_name, False)
        if field is False:
            raise KeyError(f"{map_name!r} is not a growing map of program {self.name!r}")
        table = self._table(map_name)
        items = list(table.items())
        excess = len(items) - max(0, keep)
        if excess <= 0:
            return 0

        def stamp(item: tuple[Any, Any]) -> int:
            value = item[1]
            return int(value.value if field is None else getattr(value, str(field)))

        items.sort(key=stamp)
        deleted = 0
        for key, _ in items[:excess]:
            try:
                del table[key]
                deleted += 1
            except KeyError:  # the program deleted it meanwhile (process exited)
                pass
        return deleted

    # lifecycle

    def detach(self) -> None:
        """Stop producing events: detach every attachment, keep the maps and ring
        readable (to drain the ring and read final counters) until :meth:`close`.
        Invocations already running finish on their own. Safe to call twice."""
        if self._detached:
            return
        self._detached = True
        for detach in reversed(self._detachers):
            try:
                detach()
            except Exception as exc:  # keep detaching the rest; report, never raise from cleanup
                _log.warning("detaching %s failed: %s", self.name, _one_line(str(exc)))
        self._detachers.clear()

    def close(self) -> None:
        """Detach (if not yet done) and free the programs and maps. Safe to call twice."""
        if self._closed:
            return
        self.detach()
        self._closed = True
        self.bpf.cleanup()
        atexit.unregister(self.bpf.cleanup)

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ipv4_key(addr: str | ipaddress.IPv4Address) -> int:
    """The u32 key for an IPv4 address as it sits in the packet (network byte order)."""
    packed = ipaddress.IPv4Address(addr).packed
    return int.from_bytes(packed, sys.byteorder)


class XdpFirewallProgram(LoadedProgram):
    """``xdp_firewall``: an IPv4 blocklist and a per-source rate limit."""

    @property
    def interface(self) -> str:
        return str(self.options["interface"])

    def block_ipv4(self, addr: str | ipaddress.IPv4Address) -> None:
        table = self._table("blocked_v4")
        table[table.Key(_ipv4_key(addr))] = table.Leaf(1)

    def unblock_ipv4(self, addr: str | ipaddress.IPv4Address) -> bool:
        """Remove ``addr`` from the blocklist; False if it was not there."""
        table = self._table("blocked_v4")
        try:
            del table[table.Key(_ipv4_key(addr))]
        except KeyError:
            return False
        return True

    def blocked_ipv4(self) -> set[ipaddress.IPv4Address]:
        table = self._table("blocked_v4")
        return {ipaddress.IPv4Address(int(key.value).to_bytes(4, sys.byteorder)) for key in table}

    def set_rate_limit(self, pps: int, burst: int | None = None) -> None:
        """Limit each IPv4 source to ``pps`` packets per second (0 = off), allowing
        ``burst`` back-to-back packets (default: one second's worth). Resets every
        source's state so the new limit applies from now."""
        if pps < 0 or pps > 0xFFFFFFFF:
            raise ValueError(f"rate limit must be in 0..2**32-1 packets per second, got {pps}")
        burst = max(1, pps) if burst is None else burst
        if burst < 1 or burst > 0xFFFFFFFF:
            raise ValueError(f"burst must be in 1..2**32-1 packets, got {burst}")
        config = self._table("rate_limit_cfg")
        leaf = config.Leaf()
        leaf.pps, leaf.burst = pps, burst
        config[config.Key(0)] = leaf
        self._table("rate_limit_state").clear()

    def latency_histogram(self) -> dict[str, int]:
        """Packets by time spent in the program, summed over CPUs: {"lt_100ns": n, ..., "ge_10us": n}."""
        table = self._table("latency_hist")
        return {
            name: int(sum(table.getvalue(table.Key(index))))
            for index, name in sorted(_LATENCY_BUCKETS.items())
        }


class LoadgenProgram(LoadedProgram):
    """``loadgen``: each getppid() call of one process produces K events."""

    max_events_per_call = _LOADGEN_MAX

    def configure_loadgen(self, tgid: int, events_per_call: int) -> None:
        """Make ``tgid``'s getppid() calls emit ``events_per_call`` events each (tgid 0 = off)."""
        if not 0 <= events_per_call <= _LOADGEN_MAX:
            raise ValueError(f"events per call must be in 0..{_LOADGEN_MAX}, got {events_per_call}")
        if not 0 <= tgid <= 0xFFFFFFFF:
            raise ValueError(f"tgid must be a process id, got {tgid}")
        table = self._table("loadgen_cfg")
        leaf = table.Leaf()
        leaf.tgid, leaf.events_per_call = tgid, events_per_call
        table[table.Key(0)] = leaf


_PROGRAM_CLASSES: dict[str, type[LoadedProgram]] = {
    "xdp_firewall": XdpFirewallProgram,
    "loadgen": LoadgenProgram,
}
_XDP_MODES = {"skb": "SKB_MODE", "driver": "DRV_MODE"}


# -- loading -----------------------------------------------------------------------


def _check_options(name: str, options: Mapping[str, Any], xdp: bool) -> None:
    allowed = {"interface", "mode"} if xdp else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"bpf.options.{unknown[0]}", f"program {name!r} has no such option")
    if not xdp:
        return
    interface = options.get("interface")
    if not isinstance(interface, str) or not interface:
        raise ConfigError(
            "bpf.options.interface", f"program {name!r} is XDP: name the interface to attach to"
        )
    mode = options.get("mode", "skb")
    if mode not in _XDP_MODES:
        raise ConfigError("bpf.options.mode", f"must be one of {', '.join(_XDP_MODES)}, got {mode!r}")


def _call_bcc(call: Callable[[], Any], what: str) -> tuple[Any, Exception | None, str]:
    """Run a bcc call with fd 2 captured: (result, exception or None, what bcc printed)."""
    result, failure = None, None
    with _captured_stderr() as captured:
        try:
            result = call()
        except Exception as exc:  # bcc raises bare Exceptions; the caller words the error
            failure = exc
    log = captured()
    if log.strip():
        _log.debug("bcc output while %s:\n%s", what, log)
    return result, failure, log


def _load_function(bpf: Any, program: str, function: bytes, prog_type: int) -> Any:
    fn, failure, log = _call_bcc(
        lambda: bpf.load_func(function, prog_type), f"loading {program}/{function.decode()}"
    )
    if failure is None:
        return fn
    reason = _bcc_reason(failure)
    words = "; ".join(f'"{line}"' for line in _verifier_key_lines(log)) or _one_line(str(failure))
    raise BpfLoadError(
        program,
        f"was rejected by the kernel verifier ({function.decode()}: {reason}): {words}"
        "; the full verifier log is logged with --log-level debug",
    )


def load_program(
    name: str,
    *,
    ring_buffer_size: int | None,
    map_size: int | None,
    options: Mapping[str, Any] | None = None,
    source_dir: Path | None = None,
) -> LoadedProgram:
    """Compile, verify and attach program ``name``; see the module docstring.

    ``ring_buffer_size`` (bytes) becomes a power-of-two number of pages;
    ``map_size`` bounds every hash map; None takes bpfpipe.h's default. XDP programs take
    ``options={"interface": ..., "mode": "skb" | "driver"}``. ``source_dir``
    loads ``<source_dir>/<name>.bpf.c`` instead of a packaged program (its
    quoted includes may still use this package's headers).

    Raises :class:`BpfUnavailableError` when the machine cannot load BPF,
    :class:`BpfLoadError` when the program fails to compile, verify or attach,
    and :class:`ConfigError` for unknown programs or bad options.
    """
    options = dict(options or {})
    directory = PROGRAM_DIR if source_dir is None else Path(source_dir).resolve()
    source = directory / f"{name}.bpf.c"
    if not source.is_file():
        known = ", ".join(available_programs(directory)) or "none"
        raise ConfigError("bpf.program", f"no BPF program {name!r} in {directory} (available: {known})")
    check_bpf_environment()

    page_size = os.sysconf("SC_PAGE_SIZE")
    if ring_buffer_size is None:
        ring_buffer_size = DEFAULT_RING_BUFFER_PAGES * page_size
    if map_size is None:
        map_size = DEFAULT_MAP_SIZE
    pages = ring_buffer_pages(ring_buffer_size, page_size)
    if pages * page_size != ring_buffer_size:
        _log.warning(
            "ring buffer size %d bytes is not a power-of-two number of pages; using %d bytes (%d pages)",
            ring_buffer_size,
            pages * page_size,
            pages,
        )
    entries = clamp_map_size(map_size)
    if entries != map_size:
        _log.warning("map size %d is outside %d..%d; using %d", map_size, MIN_MAP_SIZE, MAX_MAP_SIZE, entries)

    text = _inline_includes(source, [directory, PROGRAM_DIR]) + _SCHEMA_TEXT
    cflags = [
        f"-I{directory}",
        f"-I{PROGRAM_DIR}",
        f"-DBPFPIPE_RINGBUF_PAGES={pages}",
        f"-DBPFPIPE_MAP_SIZE={entries}",
    ]
    bpf = _compile(name, text, cflags)
    attachments: list[Attachment] = []
    detachers: list[Callable[[], None]] = []
    try:
        xdp = _attach_all(bpf, name, options, attachments, detachers)
        header, types, names = _event_schema(bpf, name)
        cls = _PROGRAM_CLASSES.get(name, LoadedProgram) if source_dir is None else LoadedProgram
        if not xdp and cls is XdpFirewallProgram:
            raise BpfLoadError(name, "defines no XDP function named after the program")
        program = cls(
            name=name,
            bpf=bpf,
            ring_size_bytes=pages * page_size,
            map_size=entries,
            attachments=attachments,
            detachers=detachers,
            header_dtype=header,
            event_types=types,
            event_names=names,
            options=options,
        )
    except BaseException:
        for detach in reversed(detachers):
            with contextlib.suppress(Exception):
                detach()
        bpf.cleanup()
        atexit.unregister(bpf.cleanup)
        raise
    for attachment in attachments:
        _log.info(
            "attached BPF program",
            extra={
                "program": name,
                "function": attachment.function,
                "prog_id": attachment.prog_id,
                "attach_point": attachment.attach_point,
            },
        )
    return program


def _compile(name: str, text: str, cflags: list[str]) -> Any:
    from bcc import BPF

    class _ManualAttachBPF(BPF):  # type: ignore[misc]
        """bcc attaches TRACEPOINT_PROBEs in its constructor; we attach (and report) them ourselves."""

        def _trace_autoload(self) -> None:
            pass

    bpf, failure, log = _call_bcc(
        lambda: _ManualAttachBPF(text=text.encode(), cflags=cflags), f"compiling {name}"
    )
    if failure is None:
        return bpf
    key = _compiler_key_line(log) or _one_line(str(failure))
    raise BpfLoadError(name, f"failed to compile: {key}")


def _attach_all(
    bpf: Any,
    name: str,
    options: Mapping[str, Any],
    attachments: list[Attachment],
    detachers: list[Callable[[], None]],
) -> bool:
    """Load and attach every function by convention; True if one is XDP."""
    from bcc import BPF, lib

    functions = [lib.bpf_function_name(bpf.module, i) for i in range(lib.bpf_num_functions(bpf.module))]
    xdp = name.encode() in functions
    _check_options(name, options, xdp)
    for function in functions:
        if function.startswith(b"tracepoint__"):
            fn = _load_function(bpf, name, function, BPF.TRACEPOINT)
            category, _, event = function.decode().removeprefix("tracepoint__").partition("__")
            point = f"{category}:{event}"
            _, failure, _ = _call_bcc(
                functools.partial(bpf.attach_tracepoint, tp=point.encode(), fn_name=function),
                f"attaching {name} to {point}",
            )
            if failure is not None:
                raise BpfLoadError(name, f"could not attach to tracepoint {point}: {_bcc_reason(failure)}")
            detachers.append(_tracepoint_detacher(bpf, point))
            attachments.append(Attachment(function.decode(), _prog_id(fn.fd), f"tracepoint:{point}"))
        elif function == name.encode():
            fn = _load_function(bpf, name, function, BPF.XDP)
            interface = str(options["interface"])
            mode = options.get("mode", "skb")
            flags = getattr(BPF, f"XDP_FLAGS_{_XDP_MODES[mode]}")
            # UPDATE_IF_NOEXIST: never replace another tool's XDP program.
            _, failure, _ = _call_bcc(
                functools.partial(
                    BPF.attach_xdp, interface.encode(), fn, flags | BPF.XDP_FLAGS_UPDATE_IF_NOEXIST
                ),
                f"attaching {name} to {interface}",
            )
            if failure is not None:
                reason = _bcc_reason(failure)
                if reason == os.strerror(errno.EBUSY):
                    reason += " (another XDP program is attached; remove it first)"
                raise BpfLoadError(name, f"could not attach XDP ({mode} mode) to {interface!r}: {reason}")
            detachers.append(_xdp_detacher(interface, flags))
            attachments.append(Attachment(function.decode(), _prog_id(fn.fd), f"xdp:{interface}:{mode}"))
        else:
            raise BpfLoadError(
                name,
                f"defines function {function.decode()!r} that matches no attach convention "
                f"(TRACEPOINT_PROBE, or an XDP function named {name!r}); make helpers static",
            )
    return xdp


def _tracepoint_detacher(bpf: Any, point: str) -> Callable[[], None]:
    def detach() -> None:
        bpf.detach_tracepoint(tp=point.encode())

    return detach


def _bcc_reason(failure: Exception) -> str:
    """The errno text at the end of bcc's "Failed to ...: <strerror>" messages."""
    return _one_line(str(failure).rsplit(": ", 1)[-1])


def _xdp_detacher(interface: str, flags: int) -> Callable[[], None]:
    def detach() -> None:
        from bcc import BPF

        try:
            with _captured_stderr():
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
