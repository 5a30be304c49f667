"""Load a bpfpipe BPF program: check, size, compile, verify, attach, describe.

Theory of operation
-------------------
:func:`load_program` is the orchestration; each step's rules live in the
module named for its job:

1. the config, before anything is compiled: program name and options
   (:mod:`bpf.programs`: :func:`validate_program_name`, :func:`validate_options`);
2. the machine (:mod:`bpf.environment`);
3. sizes: ring buffer pages and hash map entries (:mod:`bpf.sizing`);
4. the C text: includes spliced in, schema probes appended (:mod:`bpf.source`);
5. compiling with bcc, stderr captured into one-line errors (:mod:`bpf.diagnostics`);
6. loading every function through the verifier and attaching it by convention,
   replacing only bpfpipe's own stale XDP program left by a crash (:mod:`bpf.attach`);
7. the event dtypes, from clang's layout of the structs the program's header
   lists (:mod:`bpf.layout`), the heartbeat's among them (:mod:`bpf.heartbeat`);
8. wrapping it all in the program's class (:mod:`bpf.programs`), which owns it
   until :meth:`LoadedProgram.close`.

If any step after compiling fails, what was attached is detached and the
module freed before the error propagates.

Startup steps
-------------
The agent's startup is logged step by step (``pipeline._lifecycle``); three
steps happen here, each one line on the ``bpfpipe.steps`` logger with its
``duration_ms``. bcc does compile, map creation and program loading in one
constructor, so the boundaries are: *load programs* = checks, compile (bcc
creates every map, sized by the ``-D`` flags, while it loads the module) and
every function through the verifier (:func:`bpf.attach.load_all`); *create
maps* = the event layout read from the maps, the program object with its map
handles (ring, wake-up map) and the caller's ``prepare`` (initial map values),
all before anything runs; *attach* = the attachments, stale XDP replaced.

This module also re-exports the names callers import from ``bpf.loader``.
Importing it does not import bcc; :func:`load_program` does.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .attach import Attachment as Attachment
from .attach import Detacher, attach_all, function_names, load_all
from .diagnostics import BpfLoadError as BpfLoadError
from .diagnostics import call_bcc, compiler_key_line, one_line
from .environment import check_bpf_environment
from .heartbeat import HEARTBEAT_ATTACH_POINT, KernelHeartbeat, heartbeat_cflags, new_heartbeat_key
from .layout import EventLayout, SchemaError, event_layout
from .layout import dtype_from_ctypes as dtype_from_ctypes
from .programs import SHIPPED_PROGRAMS
from .programs import STAT_NAMES as STAT_NAMES
from .programs import ExecProgram as ExecProgram
from .programs import LoadedProgram as LoadedProgram
from .programs import LoadgenProgram as LoadgenProgram
from .programs import XdpFirewallProgram as XdpFirewallProgram
from .programs import validate_options as validate_options
from .programs import validate_program_name as validate_program_name
from .sizing import DEFAULT_MAP_SIZE as DEFAULT_MAP_SIZE
from .sizing import DEFAULT_RING_BUFFER_PAGES as DEFAULT_RING_BUFFER_PAGES
from .sizing import MAX_MAP_SIZE as MAX_MAP_SIZE
from .sizing import MAX_RING_BUFFER_PAGES as MAX_RING_BUFFER_PAGES
from .sizing import MIN_MAP_SIZE as MIN_MAP_SIZE
from .sizing import choose_sizes
from .sizing import clamp_map_size as clamp_map_size
from .sizing import ring_buffer_pages as ring_buffer_pages
from .source import HEADER_SCHEMA, SCHEMA_PREFIX, program_text
from .source import PROGRAM_DIR as PROGRAM_DIR
from .source import available_programs as available_programs

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
    "ExecProgram",
    "LoadedProgram",
    "LoadgenProgram",
    "XdpFirewallProgram",
    "available_programs",
    "clamp_map_size",
    "dtype_from_ctypes",
    "load_program",
    "ring_buffer_pages",
    "validate_options",
    "validate_program_name",
]

_log = logging.getLogger("bpfpipe.bpf")
_steps = logging.getLogger("bpfpipe.steps")


def load_program(
    name: str,
    *,
    ring_buffer_size: int | None,
    map_size: int | None,
    options: Mapping[str, Any] | None = None,
    source_dir: Path | None = None,
    prepare: Callable[[LoadedProgram], None] | None = None,
) -> LoadedProgram:
    """Compile, verify and attach program ``name``; see the module docstring.

    ``ring_buffer_size`` (bytes) becomes a power-of-two number of pages;
    ``map_size`` bounds every hash map; None takes bpfpipe_types.h's default. XDP
    programs take ``options={"interface": ..., "mode": "skb" | "driver"}``.
    ``source_dir`` loads ``<source_dir>/<name>.bpf.c`` instead of a packaged
    program (its quoted includes may still use this package's headers).

    Raises :class:`BpfUnavailableError` when the machine cannot load BPF,
    :class:`BpfLoadError` when the program fails to compile, verify or attach,
    and :class:`ConfigError` for unknown programs or bad options.

    ``prepare(program)``, if given, runs after the maps exist and before anything
    is attached (to initialise maps: a wake-up threshold, a policy). The three
    startup steps are logged on ``bpfpipe.steps`` (see Startup steps above).
    """
    started = time.perf_counter()
    options = dict(options or {})
    validate_program_name(name, source_dir)
    shipped = source_dir is None
    if shipped:
        validate_options(name, options)
    directory = PROGRAM_DIR if source_dir is None else Path(source_dir).resolve()
    check_bpf_environment()

    sizes = choose_sizes(ring_buffer_size, map_size, os.sysconf("SC_PAGE_SIZE"))
    text = program_text(directory / f"{name}.bpf.c", [directory, PROGRAM_DIR])
    cflags = [
        f"-I{directory}",
        f"-I{PROGRAM_DIR}",
        f"-DBPFPIPE_RINGBUF_PAGES={sizes.ring_pages}",
        f"-DBPFPIPE_MAP_SIZE={sizes.map_entries}",
    ]
    heartbeat_key = new_heartbeat_key()
    cflags += heartbeat_cflags(heartbeat_key, os.getpid())
    bpf = _compile(name, text, cflags)
    attachments: list[Attachment] = []
    detachers: list[Detacher] = []
    program: LoadedProgram | None = None
    try:
        functions = function_names(bpf)
        xdp = name in functions
        cls = SHIPPED_PROGRAMS[name] if shipped else LoadedProgram
        if not shipped:
            validate_options(name, options, xdp=xdp)
        elif xdp != cls.xdp:
            raise BpfLoadError(
                name,
                "defines no XDP function named after the program"
                if cls.xdp
                else f"defines an XDP function named after the program, but {cls.__name__}.xdp is False",
            )
        load_all(bpf, name, functions)
        _log_step("load programs", started, program=name, functions=len(functions))
        step_started = time.perf_counter()
        layout = _event_layout(bpf, name)
        program = cls(
            name=name,
            bpf=bpf,
            ring_size_bytes=sizes.ring_size_bytes,
            map_size=sizes.map_entries,
            attachments=attachments,
            detachers=detachers,
            header_dtype=layout.header_dtype,
            event_types=layout.event_types,
            event_names=layout.event_names,
            options=options,
        )
        if prepare is not None:
            prepare(program)
        _log_step(
            "create maps",
            step_started,
            program=name,
            ring_buffer_bytes=sizes.ring_size_bytes,
            map_entries=sizes.map_entries,
        )
        step_started = time.perf_counter()
        attach_all(bpf, name, functions, options, attachments, detachers)
        program.attachments = tuple(attachments)
        if any(a.attach_point == HEARTBEAT_ATTACH_POINT for a in attachments):
            program.heartbeat = KernelHeartbeat(name, heartbeat_key, os.getpid())
    except BaseException:
        for detach in reversed(detachers):
            with contextlib.suppress(Exception):
                detach()
        if program is not None and program.ring_wakeup is not None:
            program.ring_wakeup.close()
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
    _log_step(
        "attach", step_started, program=name, attach_points=",".join(a.attach_point for a in attachments)
    )
    return program


def _log_step(step: str, started: float, **fields: Any) -> None:
    """One startup step's line (``pipeline._lifecycle`` watches this logger)."""
    _steps.info(
        f"startup: {step}",
        extra={"step": step, "duration_ms": round((time.perf_counter() - started) * 1000, 1), **fields},
    )


def _compile(name: str, text: str, cflags: list[str]) -> Any:
    from bcc import BPF

    class _ManualAttachBPF(BPF):  # type: ignore[misc]
        """bcc attaches TRACEPOINT_PROBEs in its constructor; we attach (and report) them ourselves."""

        def _trace_autoload(self) -> None:
            pass

    bpf, failure, log = call_bcc(
        lambda: _ManualAttachBPF(text=text.encode(), cflags=cflags), f"compiling {name}"
    )
    if failure is None:
        return bpf
    key = compiler_key_line(log) or one_line(str(failure))
    raise BpfLoadError(name, f"failed to compile: {key}")


def _schema_probes(bpf: Any) -> Iterator[tuple[str, int, Any]]:
    """(event name, type id, ctypes struct) of each ``__schema_<event>`` map (see bpf.source)."""
    from bcc import lib

    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    for index in range(lib.bpf_num_tables(bpf.module)):
        table = lib.bpf_table_name(bpf.module, index).decode()
        if not table.startswith(SCHEMA_PREFIX):
            continue
        type_id = int(lib.bpf_table_max_entries_id(bpf.module, lib.bpf_table_id(bpf.module, table.encode())))
        yield table.removeprefix(SCHEMA_PREFIX), type_id, bpf[table.encode()].Leaf


def _event_layout(bpf: Any, program: str) -> EventLayout:
    try:
        return event_layout(bpf[HEADER_SCHEMA.encode()].Leaf, _schema_probes(bpf))
    except SchemaError as exc:
        raise BpfLoadError(program, str(exc)) from None
