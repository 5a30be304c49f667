"""bpfpipe's shipped programs, each declared once, and the Python API over a loaded one.

A shipped program ``<name>`` is ``<name>.bpf.c`` (the kernel code), ``<name>.h``
(what it shares with user space) and one :class:`LoadedProgram` subclass here
whose class attributes are every other fact Python needs about it:

- ``program_name``: the name it is loaded by (and the default of its preset
  source in ``stages/programs.py``); setting it registers the class in
  :data:`SHIPPED_PROGRAMS`;
- ``xdp``: it is an XDP program, so it takes ``options.interface`` and
  ``options.mode`` (:func:`validate_options`) and must define an XDP function
  named after itself;
- ``growing_map_timestamps``: its maps that grow with the workload, each with
  the timestamp field that says which entries are oldest (what the resource
  enforcer trims, :meth:`LoadedProgram.evict_oldest`);
- constants read from its header (``latency_buckets``, ``max_events_per_call``).

Everything else derives from these: the loader picks the class by name, and
:func:`validate_program_name` and :func:`validate_options` check a source's
config without loading anything (their ``ConfigError`` paths are relative to
the source's config table: ``program``, ``options.interface``). A program
loaded from another directory (``load_program(source_dir=...)``) gets the plain
:class:`LoadedProgram`, its XDP-ness found from its compiled functions.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import mmap
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import ConfigError

from .attach import XDP_MODES, Attachment, Detacher
from .diagnostics import one_line
from .source import PROGRAM_DIR, SHARED_HEADER, available_programs, header_define, header_enum

__all__ = [
    "SHIPPED_PROGRAMS",
    "STAT_NAMES",
    "XDP_OPTIONS",
    "ExecProgram",
    "LoadedProgram",
    "LoadgenProgram",
    "RingWakeup",
    "XdpFirewallProgram",
    "validate_options",
    "validate_program_name",
]

_log = logging.getLogger("bpfpipe.bpf")

_STATS = header_enum(SHARED_HEADER, "STAT")
STAT_NAMES: tuple[str, ...] = tuple(_STATS[index] for index in sorted(_STATS))
"""Per-CPU counter names in index order, from ``enum bpfpipe_stat`` in bpfpipe_types.h."""

XDP_OPTIONS = ("interface", "mode")
"""The options an XDP program takes (and all a program takes: others have none)."""

SHIPPED_PROGRAMS: dict[str, type[LoadedProgram]] = {}
"""Program name -> its class, for the programs in this package (filled by the declarations below)."""


class RingWakeup:
    """User space's side of bpfpipe.h's wake-up moderation: ``bpfpipe_wakeup[0]``, mapped.

    The kernel adds each submitted record's ring bytes to ``pending_bytes`` and
    forces a wake-up only when that reaches ``threshold_bytes`` (0: the kernel's
    default wake-ups). The reader stores 0 in ``pending_bytes`` before each read:
    a plain store through the mmap, no syscall. A record the kernel counted just
    before the reset may cost one wake-up (it will not come early); the reader's
    latency budget covers that. Field offsets come from clang's layout of
    ``struct bpfpipe_wakeup`` (bcc's ctypes leaf), not from a second copy.
    """

    def __init__(self, map_fd: int, leaf: Any) -> None:
        self._mmap = mmap.mmap(map_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        words = memoryview(self._mmap).cast("Q")
        self._words: memoryview | None = words
        self._pending = leaf.pending_bytes.offset // 8
        self._threshold = leaf.threshold_bytes.offset // 8

    @property
    def threshold_bytes(self) -> int:
        return int(self._view()[self._threshold])

    @property
    def pending_bytes(self) -> int:
        return int(self._view()[self._pending])

    def set_threshold(self, threshold_bytes: int) -> None:
        """Wake the reader once ``threshold_bytes`` of records are pending (0: on every event)."""
        if not 0 <= threshold_bytes < 1 << 63:
            raise ValueError(f"wake-up threshold must be 0..2**63-1 bytes, got {threshold_bytes}")
        self._view()[self._threshold] = threshold_bytes

    def reset_pending(self) -> None:
        """The reader is about to read everything committed: count from zero again."""
        self._view()[self._pending] = 0

    def _view(self) -> memoryview:
        if self._words is None:
            raise RuntimeError("the wake-up map is closed")
        return self._words

    def close(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
            self._mmap.close()


class LoadedProgram:
    """A compiled, verified, attached BPF program and its maps, until :meth:`close`.

    ``event_types`` maps each type id to the dtype of its record (the C struct,
    flattened; see :func:`bpf.layout.dtype_from_ctypes`); ``header_dtype`` is the
    common header every record starts with. Use as a context manager, or call
    :meth:`close` (idempotent) to detach and free everything.
    """

    program_name: ClassVar[str] = ""
    """The shipped program a subclass declares ("" here: any program, e.g. from ``source_dir``)."""
    xdp: ClassVar[bool] = False
    """An XDP program (see the module docstring)."""
    growing_map_timestamps: ClassVar[Mapping[str, str | None]] = {}
    """Map name -> the timestamp field of its value (None: the value is the timestamp)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("program_name")
        if name:
            if name in SHIPPED_PROGRAMS:
                raise TypeError(f"program {name!r} is declared twice ({SHIPPED_PROGRAMS[name].__name__})")
            SHIPPED_PROGRAMS[name] = cls

    def __init__(
        self,
        *,
        name: str,
        bpf: Any,
        ring_size_bytes: int,
        map_size: int,
        attachments: list[Attachment],
        detachers: list[Detacher],
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
        self.ring_wakeup: RingWakeup | None = _open_wakeup(bpf)
        """Wake-up moderation (None: the program does not include bpfpipe.h's helpers)."""
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
        return {name: len(self._table(name)) for name in self.growing_map_timestamps}

    def evict_oldest(self, map_name: str, keep: int) -> int:
        """Delete the entries with the oldest timestamps until at most ``keep`` remain.

        Eviction rule: every growing map has a u64 nanosecond timestamp per entry
        (``exec_procs``: the process's fork/exec time — entries whose exit was never
        seen are the oldest; ``rate_limit_state``: the source's last GCRA arrival
        time — the least recently active sources). The smallest go first. Returns
        how many entries were deleted."""
        if map_name not in self.growing_map_timestamps:
            raise KeyError(f"{map_name!r} is not a growing map of program {self.name!r}")
        field = self.growing_map_timestamps[map_name]
        table = self._table(map_name)
        items = list(table.items())
        excess = len(items) - max(0, keep)
        if excess <= 0:
            return 0

        def stamp(item: tuple[Any, Any]) -> int:
            value = item[1]
            return int(value.value if field is None else getattr(value, field))

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
                _log.warning("detaching %s failed: %s", self.name, one_line(str(exc)))
        self._detachers.clear()

    def close(self) -> None:
        """Detach (if not yet done) and free the programs and maps. Safe to call twice."""
        if self._closed:
            return
        self.detach()
        self._closed = True
        if self.ring_wakeup is not None:
            self.ring_wakeup.close()
        self.bpf.cleanup()
        atexit.unregister(self.bpf.cleanup)

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_wakeup(bpf: Any) -> RingWakeup | None:
    try:
        table = bpf[b"bpfpipe_wakeup"]
    except KeyError:
        return None
    return RingWakeup(table.map_fd, table.Leaf)


# -- the shipped programs: one declaration each -------------------------------------


class ExecProgram(LoadedProgram):
    """``exec``: process exec and exit events, from tracepoints only."""

    program_name = "exec"
    growing_map_timestamps = {"exec_procs": "start_ns"}  # struct exec_proc, exec.h


class XdpFirewallProgram(LoadedProgram):
    """``xdp_firewall``: an IPv4 blocklist and a per-source rate limit."""

    program_name = "xdp_firewall"
    xdp = True
    growing_map_timestamps = {"rate_limit_state": None}
    latency_buckets: ClassVar[dict[int, str]] = header_enum(PROGRAM_DIR / "xdp_firewall.h", "LAT")
    """Rows of ``latency_hist``: index -> "lt_100ns", ..., "ge_10us"."""

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
            for index, name in sorted(self.latency_buckets.items())
        }


def _ipv4_key(addr: str | ipaddress.IPv4Address) -> int:
    """The u32 key for an IPv4 address as it sits in the packet (network byte order)."""
    packed = ipaddress.IPv4Address(addr).packed
    return int.from_bytes(packed, sys.byteorder)


class LoadgenProgram(LoadedProgram):
    """``loadgen``: each getppid() call of one process produces K events."""

    program_name = "loadgen"
    max_events_per_call: ClassVar[int] = header_define(
        PROGRAM_DIR / "loadgen.h", "LOADGEN_MAX_EVENTS_PER_CALL"
    )

    def configure_loadgen(self, tgid: int, events_per_call: int) -> None:
        """Make ``tgid``'s getppid() calls emit ``events_per_call`` events each (tgid 0 = off)."""
        if not 0 <= events_per_call <= self.max_events_per_call:
            raise ValueError(
                f"events per call must be in 0..{self.max_events_per_call}, got {events_per_call}"
            )
        if not 0 <= tgid <= 0xFFFFFFFF:
            raise ValueError(f"tgid must be a process id, got {tgid}")
        table = self._table("loadgen_cfg")
        leaf = table.Leaf()
        leaf.tgid, leaf.events_per_call = tgid, events_per_call
        table[table.Key(0)] = leaf


# -- checking a source's config without loading anything -----------------------------


def validate_program_name(name: str, source_dir: Path | None = None) -> None:
    """Raise ``ConfigError("program", ...)`` unless ``name`` is a shipped program
    (or, with ``source_dir``, has a ``<name>.bpf.c`` there)."""
    if source_dir is None:
        if name in SHIPPED_PROGRAMS:
            return
        directory, known = PROGRAM_DIR, sorted(SHIPPED_PROGRAMS)
    else:
        directory = Path(source_dir).resolve()
        if (directory / f"{name}.bpf.c").is_file():
            return
        known = available_programs(directory)
    raise ConfigError(
        "program", f"no BPF program {name!r} in {directory} (available: {', '.join(known) or 'none'})"
    )


def validate_options(program_name: str, options: Mapping[str, Any], *, xdp: bool | None = None) -> None:
    """Check ``options`` against what the program takes, without loading it.

    Raises ``ConfigError`` whose path is relative to the source's config table
    (``program``, ``options.interface``, ``options.mode``, ``options.<unknown>``).
    ``xdp`` is for programs that are not shipped (``load_program(source_dir=...)``):
    whether they are XDP is known only once compiled. Shipped ones declare it.
    """
    if xdp is None:
        validate_program_name(program_name)
        xdp = SHIPPED_PROGRAMS[program_name].xdp
    allowed = XDP_OPTIONS if xdp else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"options.{unknown[0]}", f"program {program_name!r} has no such option")
    if not xdp:
        return
    interface = options.get("interface")
    if not isinstance(interface, str) or not interface:
        raise ConfigError(
            "options.interface", f"program {program_name!r} is XDP: name the interface to attach to"
        )
    mode = options.get("mode", "skb")
    if mode not in XDP_MODES:
        raise ConfigError("options.mode", f"must be one of {', '.join(XDP_MODES)}, got {mode!r}")
