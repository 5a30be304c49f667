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
import contextlib
import ctypes
import ipaddress
import logging
import mmap
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError

from .attach import XDP_MODES, Attachment, Detacher, attached_xdp
from .diagnostics import one_line
from .firewall_policy import (
    BlockedPrefixes,
    Network,
    PolicyChange,
    RateLimit,
    UpdateStep,
    parse_blocked_ips,
    plan_changes,
)
from .heartbeat import KernelHeartbeat
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
        self.heartbeat: KernelHeartbeat | None = None
        """The program's heartbeat trigger (set by the loader; None: it registers none)."""
        # Looked up now: bcc builds a table from the module, which close() frees, and
        # maps_problem() runs in a worker thread; a built table needs only its fd.
        self._checked_tables: dict[str, Any] = {}
        for name in ("bpfpipe_stats", "bpfpipe_rate"):
            with contextlib.suppress(KeyError):  # a program without bpfpipe.h's maps
                self._checked_tables[name] = bpf[name.encode()]
        self._detachers = detachers
        self._detached = False
        self._closed = False
        self._entry_counters: dict[str, _EntryCounter] = {}
        self._last_kernel_stats: dict[str, int] | None = None
        self._stats_reader: _PerCpuArrayReader | None = None

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

    def _stats_matrix(self) -> npt.NDArray[np.uint64]:
        """``bpfpipe_stats`` as a (counter, CPU) array: one BPF_MAP_LOOKUP_BATCH where the
        kernel has it (the reader reads these up to ten times a second; bcc's per-key
        lookups cost ~7x more CPU), else key by key. Each counter is read by the kernel
        one CPU after another, so the conservation law (events == sampled_out +
        lost_reserve + emitted) holds exactly only when no event is in flight."""
        table = self._table("bpfpipe_stats")
        if self._stats_reader is None:
            self._stats_reader = _PerCpuArrayReader(table, len(STAT_NAMES))
        return self._stats_reader.read()

    def kernel_stats_per_cpu(self) -> list[dict[str, int]]:
        """``bpfpipe_stats`` per possible CPU (see :meth:`_stats_matrix`)."""
        matrix = self._stats_matrix().T.tolist()
        return [dict(zip(STAT_NAMES, cpu, strict=True)) for cpu in matrix]

    def kernel_stats(self) -> dict[str, int]:
        """``bpfpipe_stats`` summed over CPUs (see :meth:`_stats_matrix`)."""
        totals = dict(
            zip(STAT_NAMES, self._stats_matrix().sum(axis=1, dtype=np.uint64).tolist(), strict=True)
        )
        self._last_kernel_stats = totals
        return dict(totals)

    @property
    def last_kernel_stats(self) -> dict[str, int] | None:
        """What :meth:`kernel_stats` last returned (None: never read). After
        :meth:`close` these are the final counters if the last read came after
        :meth:`detach`, as the reader's shutdown does."""
        return None if self._last_kernel_stats is None else dict(self._last_kernel_stats)

    def set_sample_rate(self, rate: int) -> None:
        """Keep 1 in ``rate`` events in the kernel (1 keeps all); kept events carry ``rate``."""
        if not isinstance(rate, int) or rate < 1 or rate > 0xFFFFFFFF:
            raise ValueError(f"sample rate must be an integer in 1..2**32-1, got {rate!r}")
        table = self._table("bpfpipe_rate")
        table[table.Key(0)] = table.Leaf(rate)
        self.gate_rate = rate

    gate_rate = 1
    """The rate last given to :meth:`set_sample_rate` (1: never): what the reader looks at
    per read, without a map lookup."""

    def sample_rate(self) -> int:
        table = self._table("bpfpipe_rate")
        return max(1, int(table[table.Key(0)].value))

    # maps, read-only (metrics)

    def map_usage(self) -> dict[str, tuple[int, int]]:
        """``{map name: (entries, max_entries)}`` for every hash-like map (hash, LRU
        hash, their per-CPU kinds, LPM trie) of the program; arrays are always full and
        the ring buffer has no entries, so they are left out. Each map is counted with
        ``BPF_MAP_LOOKUP_BATCH`` into buffers kept per map: a few syscalls for a whole
        map (a full 65,536-entry hash: ~6 ms, where bcc's ``len()`` makes one
        ``get_next_key`` syscall per key, ~75 ms). A kernel that refuses batch lookups
        for a map type falls back to walking the keys."""
        counters = self._entry_counters
        if not counters and not self._closed:
            for name in _table_names(self.bpf):
                table = self.bpf[name.encode()]
                if int(table.ttype) in _COUNTED_MAP_TYPES:
                    counters[name] = _EntryCounter(table)
        if self._closed:
            raise RuntimeError(f"BPF program {self.name!r} is closed")
        return {name: (counter.count(), counter.max_entries) for name, counter in counters.items()}

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

    # health (what the agent's readiness checks ask; see pipeline.health)

    def attachment_problem(self) -> str | None:
        """None while every attachment is in place, else what is not. An XDP attachment
        is asked of iproute2 (a subprocess: call it off the event loop); a tracepoint's
        is the perf event fd bcc holds for it."""
        if self._closed or self._detached:
            return f"program {self.name!r} is {'closed' if self._closed else 'detached'}"
        for attachment in self.attachments:
            kind, _, where = attachment.attach_point.partition(":")
            if kind == "xdp":
                interface = where.partition(":")[0]
                try:
                    ids = [a.prog_id for a in attached_xdp(interface)]
                except RuntimeError as exc:
                    return one_line(str(exc))
                if attachment.prog_id not in ids:
                    now = f"now: prog id {', '.join(map(str, ids))}" if ids else "now: none"
                    return f"XDP program {attachment.prog_id} is no longer attached to {interface} ({now})"
            elif kind == "tracepoint":
                fd = self.bpf.tracepoint_fds.get(where.encode())
                if fd is None or not _fd_open(fd):
                    return f"{attachment.function} is no longer attached to {where}"
        return None

    def maps_problem(self) -> str | None:
        """None if the program's own maps are open and ``bpfpipe_stats`` answers a
        lookup through its fd, else what failed. (The lookup is the per-CPU one: its
        value buffer is the largest any map of ours could write, should the fd ever
        have been closed and reused.)"""
        if self._closed:
            return f"program {self.name!r} is closed"
        for name, table in self._checked_tables.items():
            if not _fd_open(table.map_fd):
                return f"map {name} of {self.name!r}: fd {table.map_fd} is closed"
        stats = self._checked_tables.get("bpfpipe_stats")
        if stats is not None:
            try:
                stats.getvalue(stats.Key(0))
            except KeyError:
                return f"map bpfpipe_stats of {self.name!r}: lookup through fd {stats.map_fd} failed"
        return None

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


_COUNTED_MAP_TYPES = frozenset({1, 5, 9, 10, 11})
"""BPF_MAP_TYPE_HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE (uapi/linux/bpf.h)."""
_PERCPU_HASH_TYPES = frozenset({5, 10})
_ENOTSUPP = 524  # the kernel's own "operation not supported", not in Python's errno


def _table_names(bpf: Any) -> list[str]:
    """Names of every map of a bcc module (libbcc's ``bpf_num_tables``/``bpf_table_name``,
    which bcc's Python binding does not declare)."""
    import ctypes

    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    count = lib.bpf_num_tables(bpf.module)
    return [lib.bpf_table_name(bpf.module, index).decode() for index in range(count)]


def _lookup_batch(fd: int, resume: Any, token: Any, keys: Any, values: Any, count: Any) -> int:
    """One BPF_MAP_LOOKUP_BATCH through libbcc: 0, or its errno (ENOENT: the end of the
    map). ``resume``: the token to go on from (None: from the start); ``token`` gets the
    next one; ``count`` (a ``c_uint32``) holds the room on the way in, the entries read
    on the way out."""
    import ctypes

    from bcc.libbcc import lib

    result = lib.bpf_lookup_batch(
        fd,
        None if resume is None else ctypes.byref(resume),
        ctypes.byref(token),
        keys,
        values,
        ctypes.byref(count),
    )
    if result == 0:
        return 0
    return int(-result if result < 0 else ctypes.get_errno())


class _PerCpuArrayReader:
    """A whole per-CPU array map (keys ``0..n-1``) read with one BPF_MAP_LOOKUP_BATCH
    into buffers kept between calls; key by key through bcc where the kernel lacks
    batch lookups for arrays (before 5.6)."""

    def __init__(self, table: Any, keys: int) -> None:
        from bcc.utils import get_possible_cpus

        self._table = table
        self._keys = np.zeros(keys, dtype=np.uint32)
        # Per-CPU values are padded to 8 bytes each; the counters are u64 already.
        self._values = np.zeros((keys, len(get_possible_cpus())), dtype=np.uint64)
        self._batch_works = True

    def read(self) -> npt.NDArray[np.uint64]:
        if self._batch_works and self._read_batched():
            return self._values.copy()
        self._batch_works = False
        table = self._table
        return np.array([list(table.getvalue(table.Key(i))) for i in range(len(self._keys))], dtype=np.uint64)

    def _read_batched(self) -> bool:
        import ctypes
        import errno

        token, count = ctypes.c_uint32(0), ctypes.c_uint32(len(self._keys))
        code = _lookup_batch(
            self._table.map_fd, None, token, self._keys.ctypes.data, self._values.ctypes.data, count
        )
        # ENOENT: the end of the map, all read.
        return code in (0, errno.ENOENT) and count.value == len(self._keys)


class _EntryCounter:
    """Counts one map's entries with BPF_MAP_LOOKUP_BATCH into buffers sized for a
    full map (allocated once): one syscall per call when the map fits, which it
    always does. Keys and values are copied by the kernel and then ignored."""

    def __init__(self, table: Any) -> None:
        import ctypes

        from bcc.utils import get_possible_cpus

        self._table = table
        self.max_entries = int(table.max_entries)
        key_size = ctypes.sizeof(table.Key)
        value_size = ctypes.sizeof(table.Leaf)
        if int(table.ttype) in _PERCPU_HASH_TYPES:
            value_size = (value_size + 7) // 8 * 8 * len(get_possible_cpus())
        self._key_size, self._value_size = key_size, value_size
        self._keys = (ctypes.c_uint8 * (key_size * self.max_entries))()
        self._values = (ctypes.c_uint8 * (value_size * self.max_entries))()
        self._batch_works = True

    def count(self) -> int:
        if self._batch_works:
            counted = self._count_batched()
            if counted is not None:
                return counted
            self._batch_works = False
        return sum(1 for _ in self._table)  # get_next_key per key (bcc's LpmTrie has no len())

    def _count_batched(self) -> int | None:
        import ctypes
        import errno

        token, count, total = ctypes.c_uint32(0), ctypes.c_uint32(0), 0
        while total < self.max_entries:
            count.value = self.max_entries - total
            code = _lookup_batch(
                self._table.map_fd,
                token if total else None,
                token,
                ctypes.byref(self._keys, self._key_size * total),
                ctypes.byref(self._values, self._value_size * total),
                count,
            )
            total += count.value
            if code != 0:
                if code == errno.ENOENT:  # the end of the map: the normal way out
                    return total
                if total == 0 and code in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                    return None  # this kernel has no batch lookup for the map type
                raise OSError(code, f"BPF_MAP_LOOKUP_BATCH failed: {errno.errorcode.get(code, code)}")
            if count.value == 0:  # no progress (a concurrent update): what we have
                return total
        return total


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


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
    """``xdp_firewall``: IPv4/IPv6 prefix blocklists (LPM tries) and a per-source rate limit.

    The policy (:mod:`bpf.firewall_policy`) lives in the program's maps:
    ``blocked_v4``/``blocked_v6`` (a prefix -> 1), ``rate_limit_cfg[0]`` and the
    per-source GCRA state ``rate_limit_state``. :meth:`apply_policy` changes them by
    difference while the program stays attached; the maps are the truth it diffs
    against (so prefixes added with :meth:`block_ipv4` are removed by a policy that
    does not list them).
    """

    program_name = "xdp_firewall"
    xdp = True
    growing_map_timestamps = {"rate_limit_state": None}
    latency_buckets: ClassVar[dict[int, str]] = header_enum(PROGRAM_DIR / "xdp_firewall.h", "LAT")
    """Rows of ``latency_hist``: index -> "lt_100ns", ..., "ge_10us"."""

    @property
    def interface(self) -> str:
        return str(self.options["interface"])

    # the blocklists

    def block_ipv4(self, addr: str | ipaddress.IPv4Address) -> None:
        """Block one IPv4 source (its /32)."""
        self._insert_prefix(ipaddress.IPv4Network(ipaddress.IPv4Address(addr)))

    def unblock_ipv4(self, addr: str | ipaddress.IPv4Address) -> bool:
        """Remove ``addr``'s /32 from the blocklist; False if it was not there (a
        covering prefix, if any, still blocks it)."""
        return self._delete_prefix(ipaddress.IPv4Network(ipaddress.IPv4Address(addr)))

    def blocked_ipv4(self) -> set[ipaddress.IPv4Address]:
        """The single IPv4 addresses (/32 entries) blocked; :meth:`blocked_prefixes` has all."""
        return {net.network_address for net in self.blocked_prefixes().v4 if net.prefixlen == 32}

    def blocked_prefixes(self) -> BlockedPrefixes:
        """Every prefix in ``blocked_v4`` and ``blocked_v6``."""
        v4 = {ipaddress.IPv4Network(key) for key in _lpm_keys(self._table("blocked_v4"))}
        v6 = {ipaddress.IPv6Network(key) for key in _lpm_keys(self._table("blocked_v6"))}
        return BlockedPrefixes(frozenset(v4), frozenset(v6))

    def _insert_prefix(self, network: Network) -> None:
        table = self._table(_LPM_MAPS[network.version])
        table[_lpm_key(table, network)] = table.Leaf(1)

    def _delete_prefix(self, network: Network) -> bool:
        table = self._table(_LPM_MAPS[network.version])
        try:
            del table[_lpm_key(table, network)]
        except KeyError:
            return False
        return True

    # the rate limit

    def rate_limit(self) -> RateLimit:
        """The limit in force (``burst`` as the kernel has it; pps 0: off)."""
        leaf = self._table("rate_limit_cfg")[self._table("rate_limit_cfg").Key(0)]
        return RateLimit(pps=int(leaf.pps), burst=int(leaf.burst) if leaf.pps else 0)

    def set_rate_limit(self, pps: int, burst: int | None = None) -> None:
        """Limit each source (an IPv4 address, an IPv6 /64) to ``pps`` packets per second
        (0 = off), allowing ``burst`` back-to-back packets (default: one second's worth).
        Resets every source's state so the new limit applies from now."""
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

    # the whole policy, by difference

    def apply_policy(
        self, blocked_ips: BlockedPrefixes | Iterable[str], rate_limit: RateLimit | None = None
    ) -> PolicyChange:
        """Make the maps hold exactly ``blocked_ips`` (strings are parsed as the config's
        ``blocked_ips``) and, unless None, ``rate_limit``; returns what changed.

        By difference, without detaching: per family, new prefixes are inserted before
        removed ones are deleted (:func:`bpf.firewall_policy.plan_update`), so an
        address blocked before and after is never let through in between. The rate
        limit is written only if it changed (then every source starts afresh, as
        :meth:`set_rate_limit`). If a map update fails, what this call already did is
        undone (best effort, in the same insert-first order) and ``RuntimeError`` says
        which update failed. Costs one syscall per entry of the blocklists plus one per
        change: call it off the event loop for big lists.
        """
        if not isinstance(blocked_ips, BlockedPrefixes):
            blocked_ips = parse_blocked_ips(list(blocked_ips))
        plans = []
        families: tuple[tuple[str, type[Network], frozenset[Any]], ...] = (
            ("blocked_v4", ipaddress.IPv4Network, blocked_ips.v4),
            ("blocked_v6", ipaddress.IPv6Network, blocked_ips.v6),
        )
        for table_name, network_type, target in families:
            # Diffed as (address, length) pairs: a network object per entry the map
            # holds would cost several times reading the map.
            table = self._table(table_name)
            have = _lpm_keys(table)
            want: dict[tuple[int, int], Network] = {
                (int(net.network_address), net.prefixlen): net for net in target
            }
            added = [want[key] for key in want.keys() - have]
            removed = [network_type(key) for key in have - want.keys()]
            plans.append(
                plan_changes(added, removed, current_size=len(have), capacity=int(table.max_entries))
            )
        done: list[UpdateStep] = []
        try:
            for plan in plans:
                for step in plan.steps:
                    for network in step.networks:
                        if step.op == "insert":
                            self._insert_prefix(network)
                        else:
                            self._delete_prefix(network)
                        done.append(UpdateStep(step.op, (network,)))
        except Exception as exc:
            self._undo(done)
            failed = f"{'inserting' if step.op == 'insert' else 'deleting'} {network}"
            raise RuntimeError(f"firewall policy not applied: {failed} failed: {one_line(str(exc))}") from exc
        rate_change = None
        if rate_limit is not None:
            before = self.rate_limit()
            if _kernel_rate(before) != _kernel_rate(rate_limit):
                self.set_rate_limit(rate_limit.pps, rate_limit.effective_burst)
                rate_change = (before, rate_limit)
        return PolicyChange(
            added=tuple(n for plan in plans for n in plan.inserted),
            removed=tuple(n for plan in plans for n in plan.deleted),
            rate_limit=rate_change,
            gapless=all(plan.gapless for plan in plans),
        )

    def _undo(self, done: list[UpdateStep]) -> None:
        """Put back what was deleted, then take out what was inserted."""
        for op in ("delete", "insert"):
            for step in reversed(done):
                if step.op != op:
                    continue
                try:
                    if op == "delete":
                        self._insert_prefix(step.networks[0])
                    else:
                        self._delete_prefix(step.networks[0])
                except Exception as exc:  # report, keep undoing the rest
                    _log.warning("undoing a firewall policy update failed: %s", one_line(str(exc)))

    def latency_histogram(self) -> dict[str, int]:
        """Packets by time spent in the program, summed over CPUs: {"lt_100ns": n, ..., "ge_10us": n}."""
        table = self._table("latency_hist")
        return {
            name: int(sum(table.getvalue(table.Key(index))))
            for index, name in sorted(self.latency_buckets.items())
        }


_LPM_MAPS = {4: "blocked_v4", 6: "blocked_v6"}
"""IP version -> its blocklist (an LPM trie keyed by struct xdp_lpm_v4 / xdp_lpm_v6)."""


def _lpm_key(table: Any, network: Network) -> Any:
    """The trie key for ``network``: its prefix length, then its address as on the wire."""
    key = table.Key()
    key.prefixlen = network.prefixlen
    packed = network.network_address.packed
    ctypes.memmove(ctypes.addressof(key.addr), packed, len(packed))
    return key


def _lpm_keys(table: Any) -> set[tuple[int, int]]:
    """Every prefix a blocklist trie holds, as (network address as an integer, prefix
    length), key by key (10,000 keys: ~15 ms; bcc's ``items_lookup_batch`` crashed the
    process on an LPM trie here). Host bits an outside writer (bpftool) left in a key
    are masked off, as the trie itself ignores them."""
    keys = set()
    for key in table:
        bits, length = 8 * len(key.addr), int(key.prefixlen)
        host_mask = (1 << (bits - min(length, bits))) - 1
        keys.add((int.from_bytes(bytes(key.addr), "big") & ~host_mask, length))
    return keys


def _kernel_rate(limit: RateLimit) -> tuple[int, int]:
    """What ``rate_limit_cfg`` would hold for ``limit`` (off is off, whatever the burst)."""
    return (limit.pps, limit.effective_burst) if limit.pps else (0, 0)


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
