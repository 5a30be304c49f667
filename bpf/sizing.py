"""How big a program's ring buffer and hash maps are: the rules and the defaults.

The kernel wants a ring buffer of a power-of-two number of pages; hash maps get
a bounded number of entries. :func:`choose_sizes` applies both to what was
configured (None: the default from bpfpipe_types.h) and warns once when it had
to change a value. The results reach the C code as ``-DBPFPIPE_RINGBUF_PAGES``
and ``-DBPFPIPE_MAP_SIZE``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .source import SHARED_HEADER, header_define

__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_RING_BUFFER_PAGES",
    "MAX_MAP_SIZE",
    "MAX_RING_BUFFER_PAGES",
    "MIN_MAP_SIZE",
    "Sizes",
    "choose_sizes",
    "clamp_map_size",
    "ring_buffer_pages",
]

_log = logging.getLogger("bpfpipe.bpf")

MAX_RING_BUFFER_PAGES = 1 << 18  # 1 GiB of 4 KiB pages
MIN_MAP_SIZE = 128
MAX_MAP_SIZE = 1 << 22
DEFAULT_RING_BUFFER_PAGES = header_define(SHARED_HEADER, "BPFPIPE_RINGBUF_PAGES")
DEFAULT_MAP_SIZE = header_define(SHARED_HEADER, "BPFPIPE_MAP_SIZE")


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


@dataclass(frozen=True, slots=True)
class Sizes:
    ring_pages: int
    ring_size_bytes: int
    map_entries: int


def choose_sizes(ring_buffer_size: int | None, map_size: int | None, page_size: int) -> Sizes:
    """The sizes to compile with; logs a warning for each configured value it changed."""
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
    return Sizes(ring_pages=pages, ring_size_bytes=pages * page_size, map_entries=entries)
