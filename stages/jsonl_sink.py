"""JSON-lines sink: one object per event, to stdout (``path = "-"``) or a file.

One ``msgspec.json.Encoder`` is reused for the sink's lifetime; each batch is
encoded with a single ``encode_lines`` call and written with one ``write``.
Char-array fields are written as text; every event carries its ``weight``.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

import msgspec

from pipeline import Batch, BatchSink, StageContext
from pipeline.errors import SinkClosed


class JsonLinesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    path: str = "-"
    """File to append to; ``-`` is standard output."""
    flush: bool = True
    """Flush after every batch (lines appear promptly; costs a syscall per batch)."""


class JsonLinesSink(BatchSink):
    Config = JsonLinesConfig
    config: JsonLinesConfig

    def __init__(self, config: JsonLinesConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._encoder = msgspec.json.Encoder()
        self._out: IO[bytes] | None = None

    def _stream(self) -> IO[bytes]:
        if self._out is None:
            if self.config.path == "-":
                self._out = sys.stdout.buffer
            else:
                self._out = open(self.config.path, "ab")  # noqa: SIM115 - closed in aclose()
        return self._out

    async def write(self, batch: Batch) -> None:
        records: list[Any] = list(batch.records())
        out = self._stream()
        try:
            out.write(self._encoder.encode_lines(records))
            if self.config.flush:
                out.flush()
        except BrokenPipeError:
            if out is sys.stdout.buffer:
                # Whoever read our stdout is gone (e.g. `bpfpipe run | head`): point fd 1
                # at /dev/null so the interpreter's final flush does not complain.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            raise SinkClosed(f"{self.config.path}: broken pipe") from None

    async def aclose(self) -> None:
        if self._out is None:
            return
        if self._out is sys.stdout.buffer:
            self._out.flush()
        else:
            self._out.close()
        self._out = None
