"""Replaying a breaker's spool through its primary, in order, once the primary is back.

A spool (:class:`stages.spool_sink.SpoolSink`) that a breaker may replay keeps, next to
``<path>``, two small files:

* ``<path>.index``: one JSON line per spooled batch, appended right after the batch's
  lines reached the spool: where they are (byte range ``start``..``end`` of the spool),
  how many events, and the batch's identity (``run``, ``source``, ``seq``, ``event``).
  The identity is what lets a primary such as the JetStream sink give a replayed batch the
  very message ids its first attempt had, so the stream drops what that attempt already
  delivered.
* ``<path>.replayed``: how many bytes of the index have been replayed (acknowledged by the
  primary), replaced whole (temporary file and rename) after each replayed batch. A crash
  mid-replay resumes after the last acknowledged batch, so at most one batch is sent twice
  (and the stream's dedup window drops that copy).

When everything indexed has been replayed, the spool and its index are emptied (the
position file first, so a crash in between replays again rather than skipping). Lines a
crash left in the spool without their index line are not replayed (their events were
recorded as ``fallback`` by the run that spooled them).

The pure part — which index entries are still to be replayed, from the index's bytes and
the position — is :func:`pending_entries`; :class:`SpoolReplayFiles` is the thin I/O shell.
Accounting: spooled events already have their outcome (``fallback``); a replay only adds
statistics (``replayed_batches``/``replayed_events``), never ledger entries.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import msgspec

__all__ = [
    "IndexEntry",
    "Replayable",
    "SpoolReplayFiles",
    "SpooledBatch",
    "pending_entries",
    "replay_groups",
    "run_id",
]


@functools.cache
def run_id() -> str:
    """This process's identity in message ids (hex nanoseconds at first use): batch ``seq``
    numbers restart with every run, so ``(source, seq)`` alone would repeat across runs."""
    return f"{time.time_ns():x}"


class IndexEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One spooled batch: its lines are ``spool[start:end]``."""

    run: str
    source: str
    seq: int
    event: str
    events: int
    start: int
    end: int


_INDEX_DECODER = msgspec.json.Decoder(IndexEntry)
_INDEX_ENCODER = msgspec.json.Encoder()


def encode_entry(entry: IndexEntry) -> bytes:
    return _INDEX_ENCODER.encode(entry) + b"\n"


def replay_groups(
    entries: Sequence[tuple[IndexEntry, int]], max_events: int, max_batches: int
) -> list[list[tuple[IndexEntry, int]]]:
    """Consecutive runs of ``entries`` replayed together (one read, one delivery, one
    position update): at most ``max_batches`` batches and, unless a single batch is larger,
    ``max_events`` events each."""
    groups: list[list[tuple[IndexEntry, int]]] = []
    current: list[tuple[IndexEntry, int]] = []
    events = 0
    for item in entries:
        if current and (len(current) >= max_batches or events + item[0].events > max_events):
            groups.append(current)
            current, events = [], 0
        current.append(item)
        events += item[0].events
    if current:
        groups.append(current)
    return groups


def pending_entries(index: bytes, replayed_bytes: int) -> list[tuple[IndexEntry, int]]:
    """Entries of ``index`` (the index file's bytes) past ``replayed_bytes``, each with the
    index offset just past it (the position to persist once it is replayed). A last line
    without its newline (torn by a crash) is not an entry yet; a position past the end (a
    stale position file) means nothing is pending."""
    out: list[tuple[IndexEntry, int]] = []
    offset = max(replayed_bytes, 0)
    while offset < len(index):
        end = index.find(b"\n", offset)
        if end < 0:
            break
        line = index[offset:end]
        offset = end + 1
        if line.strip():
            out.append((_INDEX_DECODER.decode(line), offset))
    return out


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """A spooled batch read back: its identity and its JSON lines, as the spool holds them."""

    run: str
    source: str
    seq: int
    event_name: str
    events: int
    lines: bytes


@runtime_checkable
class Replayable(Protocol):
    """A primary that can take a spooled batch back (JSON lines, as spooled) and deliver it
    as it would have delivered the batch (the JetStream sink: same messages, same ids)."""

    async def write_spooled(self, batches: Sequence[SpooledBatch]) -> None:
        """Deliver these spooled batches, in order, or raise (then any of them may have
        been delivered: a retry must not deliver those twice)."""
        ...


class SpoolReplayFiles:
    """Blocking file access for a replay (call it from a worker thread)."""

    def __init__(self, spool_path: str) -> None:
        self.spool = Path(spool_path)
        self.index = Path(f"{spool_path}.index")
        self.position = Path(f"{spool_path}.replayed")

    def replayed_bytes(self) -> int:
        try:
            return int(self.position.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> list[tuple[IndexEntry, int]]:
        try:
            data = self.index.read_bytes()
        except FileNotFoundError:
            return []
        return pending_entries(data, self.replayed_bytes())

    def read(self, entries: Sequence[IndexEntry]) -> list[SpooledBatch]:
        out = []
        with self.spool.open("rb") as f:
            for entry in entries:
                f.seek(entry.start)
                lines = f.read(entry.end - entry.start)
                if lines.startswith(b"\n"):  # the spool's repair of a file that lacked its last newline
                    lines = lines[1:]
                out.append(SpooledBatch(entry.run, entry.source, entry.seq, entry.event, entry.events, lines))
        return out

    def mark_replayed(self, index_offset: int) -> None:
        tmp = self.position.with_name(self.position.name + ".tmp")
        tmp.write_text(f"{index_offset}\n")
        os.replace(tmp, self.position)

    def clear_position(self) -> None:
        self.position.unlink(missing_ok=True)
