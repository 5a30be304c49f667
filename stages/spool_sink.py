"""SpoolSink: JSON lines to a local file that never grows past ``max_bytes``.

The circuit breaker's default fallback: while an exporter is down, its batches
are spooled here instead of being lost, and the cap keeps a long outage from
filling the disk. Usable as an ordinary sink too (``use = "stages.spool_sink:SpoolSink"``).

Invariants:

* The file only ever holds whole lines: a batch that does not fit is cut at a line
  boundary; the events past the cut are *overflow*, never partly written.
* The cap includes what the file already held when it was opened, so a restart
  does not reset it. The sink never rotates the file nor truncates what it has
  written (only a write that failed half-way); move it away (and restart) to make
  room again.
* Overflow is counted as dropped with reason ``spool full`` — by this sink when it
  runs on its own, by the breaker when it is a fallback (:meth:`SpoolSink.spool`
  returns how many events fit and leaves the accounting to its caller).
* Lines on disk are exactly the events counted as spooled: a write the disk cannot
  take whole (ENOSPC, EIO) is truncated back to the last whole line and raises
  ``SinkClosed`` (on its own, the sink then stops and drops the rest as ``output closed``).

Each line is one event exactly as the ``jsonl`` sink writes it (``event``, ``time``,
the fields, ``weight``: see :mod:`stages.jsonl_sink`), by the same encoder. Writes go
through a :class:`pipeline.LineOutput` thread, so a slow disk never blocks the loop.

With ``replay_index`` (the breaker sets it when its primary can replay), every spooled
batch also gets a line in ``<path>.index`` saying where its lines are and which batch they
were; :mod:`stages.spool_replay` describes the files and the replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
import trio

from pipeline import Batch, BatchReceiver, LineOutput, Outcome, Sink, SinkClosed, StageContext
from pipeline import Config as Settings

from .jsonl_sink import JsonLinesEncoder, line_ends, output_problem
from .spool_replay import IndexEntry, SpoolReplayFiles, encode_entry, run_id

__all__ = ["SPOOL_FULL", "SpoolConfig", "SpoolSink", "SpoolStatistics"]

SPOOL_FULL = "spool full"
"""The drop reason for events that did not fit under ``max_bytes``."""


class SpoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    path: str = "bpfpipe-spool.jsonl"
    """File to append to (relative to the working directory); parent directories are created."""
    max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 * 1024 * 1024
    """Size the file may reach, counting what it held before we opened it."""
    flush: bool = True
    """Flush after every batch, so a crash loses at most the batch being written."""
    replay_index: bool = False
    """Also keep ``<path>.index`` (where each spooled batch is, and its identity) so a
    breaker can replay the spool through its primary; set by the breaker when it can."""


@dataclass(frozen=True, slots=True)
class SpoolStatistics:
    path: str
    size_bytes: int
    max_bytes: int
    spooled_events: int
    overflow_events: int


class SpoolSink(Sink):
    Config = SpoolConfig
    config: SpoolConfig

    def __init__(self, config: SpoolConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._encoder = JsonLinesEncoder()
        self._out: LineOutput | None = None
        self.size_bytes = 0
        """Bytes in the file (known once it has been opened)."""
        self.spooled_events = 0
        self.overflow_events = 0
        self.replay_files = SpoolReplayFiles(config.path)
        self.index_size_bytes = -1
        """Bytes in ``<path>.index`` (``-1`` until first looked at; see :meth:`index_size`)."""

    @classmethod
    def resolve_config(cls, config: SpoolConfig, settings: Settings) -> SpoolConfig:
        output_problem(config.path, create_parents=True)
        return config

    async def spool(self, batch: Batch) -> int:
        """Append as many of the batch's events as fit, whole lines only; return how
        many (a prefix of the batch). Raises ``SinkClosed`` if the disk is full or
        failing, ``OSError`` if the file cannot be written otherwise; then none of
        the batch is in the file."""
        out = self._stream()
        room = self.config.max_bytes - self.size_bytes
        n = len(batch)
        if room <= 0 or n == 0:
            self.overflow_events += n
            return 0
        blob = b"".join(await self._encoder.encode_batch(batch))
        kept = n
        if len(blob) > room:
            ends = line_ends(blob)
            kept = int(np.searchsorted(ends, room, side="right"))
            blob = blob[: int(ends[kept - 1])] if kept else b""
        start = out.size_bytes
        if blob:
            try:
                await out.write([blob])
            finally:
                self.size_bytes = out.size_bytes
        if self.config.replay_index and kept:
            entry = IndexEntry(
                run_id(), batch.source, batch.seq, batch.event_name, kept, start, out.size_bytes
            )
            await self._append_index(encode_entry(entry))
        self.spooled_events += kept
        self.overflow_events += n - kept
        return kept

    async def run(
        self, rx: BatchReceiver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        ctx = self.ctx
        task_status.started()
        try:
            async for batch in rx:
                try:
                    kept = await self.spool(batch)
                except SinkClosed as exc:
                    await ctx.output_closed(exc, batch, rx)
                    break
                except OSError as exc:
                    ctx.error(exc, "spool()")
                    ctx.drop_batch(batch, reason="error")
                    continue
                ctx.record(Outcome.DELIVERED, kept, float(batch.weights[:kept].sum()))
                ctx.drop(len(batch) - kept, float(batch.weights[kept:].sum()), reason=SPOOL_FULL)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def index_size(self) -> int:
        """Bytes in ``<path>.index`` now (read from the file once, then kept up to date). The
        first look cuts a last line a crash left unfinished, so the next line starts afresh."""
        if self.index_size_bytes < 0:
            index = self.replay_files.index

            def whole_lines() -> int:
                if not index.exists():
                    return 0
                data = index.read_bytes()
                keep = data.rfind(b"\n") + 1
                if keep != len(data):
                    with index.open("r+b") as f:
                        f.truncate(keep)
                return keep

            self.index_size_bytes = await trio.to_thread.run_sync(whole_lines)
        return self.index_size_bytes

    async def _append_index(self, line: bytes) -> None:
        size = await self.index_size()

        def append() -> None:
            with self.replay_files.index.open("ab") as f:
                f.write(line)

        await trio.to_thread.run_sync(append)
        self.index_size_bytes = size + len(line)

    async def empty(self) -> None:
        """Start the spool afresh once all of it has been replayed: the replay position
        goes first (a crash in between replays again rather than skipping), then the index,
        then the spool's lines."""
        await self.aclose()
        files = self.replay_files

        def truncate() -> None:
            files.clear_position()
            for path in (files.index, files.spool):
                if path.exists():
                    with path.open("r+b") as f:
                        f.truncate(0)

        await trio.to_thread.run_sync(truncate)
        self.size_bytes = 0
        self.index_size_bytes = 0

    async def aclose(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            await out.aclose()

    def statistics(self) -> SpoolStatistics:
        return SpoolStatistics(
            self.config.path,
            self.size_bytes,
            self.config.max_bytes,
            self.spooled_events,
            self.overflow_events,
        )

    def _stream(self) -> LineOutput:
        if self._out is None:
            self._out = LineOutput.open(self.config.path, create_parents=True)
            self.size_bytes = self._out.size_bytes
        return self._out
