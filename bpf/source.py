"""The C text bcc compiles, and the constants Python reads back from the headers.

A program ``<name>`` is ``<name>.bpf.c`` in this package's directory (so the
programs ship with the package), or in the ``source_dir`` given to the loader.

Why the source is inlined: bcc rewrites map method calls (``map.lookup()``)
only in the main file, and generates ``TRACEPOINT_PROBE`` argument structs only
there, so :func:`program_text` splices quoted ``#include`` files found next to
the program into one text, with ``#line`` markers so compiler errors still name
the real file and line (re-synced after each ``TRACEPOINT_PROBE``, before which
bcc inserts the multi-line argument struct).

Why schema probes are appended: each program's header lists its events as
``BPFPIPE_EVENTS(X)`` entries ``X(type id, struct name, event name)``. The text
gets one hidden array map per entry (named ``__schema_<event>``), whose leaf
type is the event struct and whose ``max_entries`` is the type id, plus one for
the common header and, in a program that includes bpfpipe.h, one for the
heartbeat (``struct bpfpipe_heartbeat``, type id ``BPFPIPE_EVENT_HEARTBEAT``,
event name ``heartbeat``); bcc then describes clang's layout of each struct, and
:mod:`bpf.layout` turns that into numpy dtypes.

Constants Python needs (counter names, default sizes, histogram buckets) are
read from the headers that define them with :func:`header_enum` and
:func:`header_define`, never restated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .layout import HEADER_STRUCT

__all__ = [
    "HEADER_SCHEMA",
    "PROGRAM_DIR",
    "SCHEMA_PREFIX",
    "SHARED_HEADER",
    "available_programs",
    "header_define",
    "header_enum",
    "program_text",
]

PROGRAM_DIR = Path(__file__).resolve().parent
SHARED_HEADER = PROGRAM_DIR / "bpfpipe_types.h"
"""What every program shares with user space: event header, counters, defaults."""
SCHEMA_PREFIX = "__schema_"
"""Probe map ``__schema_<event>``: leaf type = the event struct, max_entries = its type id."""
HEADER_SCHEMA = "__bpfpipe_header"
"""Probe map whose leaf type is the common header."""
_MAX_INCLUDE_DEPTH = 16

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_TRACEPOINT_PROBE = re.compile(r"^\s*TRACEPOINT_PROBE\s*\(.*\)")

_SCHEMA_TEXT = f"""
/* --- appended by bpf/source.py: layout probes for the event dtypes --- */
BPF_ARRAY({HEADER_SCHEMA}, struct {HEADER_STRUCT}, 1);
#ifdef BPFPIPE_EVENTS
#define __BPFPIPE_SCHEMA(type_id, struct_name, event_name) \\
    BPF_ARRAY({SCHEMA_PREFIX}##event_name, struct struct_name, type_id);
BPFPIPE_EVENTS(__BPFPIPE_SCHEMA)
#endif
#ifdef BPFPIPE_H
BPF_ARRAY({SCHEMA_PREFIX}heartbeat, struct bpfpipe_heartbeat, BPFPIPE_EVENT_HEARTBEAT);
#endif
"""


def available_programs(source_dir: Path = PROGRAM_DIR) -> list[str]:
    """Names of the programs (``<name>.bpf.c``) in ``source_dir``, sorted."""
    return sorted(path.name.removesuffix(".bpf.c") for path in source_dir.glob("*.bpf.c"))


def program_text(source: Path, search: Sequence[Path]) -> str:
    """What bcc compiles for ``source``: its includes spliced in, schema probes appended."""
    return _inline_includes(source, search) + _SCHEMA_TEXT


def _inline_includes(path: Path, search: Sequence[Path], depth: int = 0) -> str:
    if depth > _MAX_INCLUDE_DEPTH:
        raise ValueError(f"#include nesting deeper than {_MAX_INCLUDE_DEPTH} at {path}")
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


def header_enum(header: Path, prefix: str) -> dict[int, str]:
    """``PREFIX_NAME = value`` entries of a C enum, as {value: "name"} (lowercase);
    ``PREFIX__*`` entries (counts such as ``STAT__MAX``) are left out."""
    entries = re.findall(rf"\b{prefix}_(\w+)\s*=\s*(\d+)", header.read_text())
    return {int(value): name.lower() for name, value in entries if not name.startswith("_")}


def header_define(header: Path, name: str) -> int:
    """The integer value of ``#define NAME <digits>`` in a header."""
    match = re.search(rf"#define\s+{name}\s+(\d+)", header.read_text())
    if match is None:
        raise RuntimeError(f"{header} lacks '#define {name} <number>'")
    return int(match.group(1))
