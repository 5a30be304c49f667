"""JSON-lines sink: one object per event, to stdout (``path = "-"``) or a file.

Encoding (:class:`JsonLinesEncoder`) is per column, not per event: each column
becomes a Python list once per batch (char arrays decoded as text in one pass),
rows are msgspec structs built from those lists and encoded with one
``encode_lines`` call. The bytes are exactly those of
``msgspec.json.Encoder().encode_lines(list(batch.records()))`` (a property test
holds us to it), at several times the speed. Batches are encoded in slices of
``SLICE_EVENTS`` with a checkpoint between slices, so a huge batch does not hold
the event loop.

Writing never blocks the loop either: a :class:`pipeline.output.LineOutput` thread
does the ``write(2)``; ``write`` waits for it, so a stalled reader of stdout is
back-pressure, and signals still work. A batch is written whole or not at all (a
file that fills up is truncated back to its last whole line), so delivered events
are exactly the lines in the file. An output that is gone (EPIPE, ENOSPC, EIO)
raises ``SinkClosed``: the pipeline stops and records the rest as ``output closed``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import trio

from pipeline import Batch, BatchSink, ConfigError, LineOutput, StageContext, appendable_problem
from pipeline import Config as Settings

__all__ = ["SLICE_EVENTS", "JsonLinesConfig", "JsonLinesEncoder", "JsonLinesSink"]

SLICE_EVENTS = 65536
"""Events encoded between two checkpoints."""

_SIMPLE_KINDS = frozenset("biuf")


class JsonLinesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    path: str = "-"
    """File to append to; ``-`` is standard output."""
    flush: bool = True
    """Kept for compatibility: every batch is written (and so visible) before ``write`` returns."""


def _text_column(column: npt.NDArray[Any]) -> list[str]:
    """A char-array column as text, as ``pipeline.Batch.records`` decodes it: up to the
    first NUL, UTF-8 with replacement. ``tolist`` strips trailing NULs in C, so a NUL
    left in the joined bytes is one inside a value: the rare slow path."""
    values: list[bytes] = column.tolist()
    joined = b"".join(values)
    if b"\0" in joined:
        return [v.split(b"\0", 1)[0].decode("utf-8", "replace") for v in values]
    if joined.isascii():
        return list(map(bytes.decode, values))
    return [v.decode("utf-8", "replace") for v in values]


def _is_simple(field: np.dtype[Any]) -> bool:
    if field.subdtype is not None or field.names is not None:
        return False
    return field.kind in _SIMPLE_KINDS or (field.kind == "S" and field.itemsize > 0)


class JsonLinesEncoder:
    """Batches → JSON lines, byte-identical to ``encode_lines(list(batch.records()))``.

    Scalar fields (bool, int, float, char arrays) take the fast per-column path; a
    dtype with anything else (sub-arrays, nested records, a field named ``weight``)
    falls back to ``records()``, whose output is the definition."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()
        self._row_types: dict[np.dtype[Any], Callable[..., Any] | None] = {}

    def encode(self, events: npt.NDArray[Any], weights: npt.NDArray[np.float64]) -> bytes:
        row_type = self._row_type(events.dtype)
        if row_type is None:
            return self._encoder.encode_lines(list(Batch(events, weights).records()))
        dtype = events.dtype
        names = dtype.names or ()
        columns: list[list[Any]] = [
            _text_column(events[name]) if dtype[name].kind == "S" else events[name].tolist() for name in names
        ]
        columns.append(weights.tolist())
        return self._encoder.encode_lines(list(itertools.starmap(row_type, zip(*columns, strict=True))))

    async def encode_batch(self, batch: Batch, slice_events: int = SLICE_EVENTS) -> list[bytes]:
        """The batch's lines in slices, with a checkpoint after each slice but the last."""
        events, weights = batch.events, batch.weights
        blobs = []
        for start in range(0, len(events), slice_events):
            if start:
                await trio.lowlevel.checkpoint()
            stop = start + slice_events
            blobs.append(self.encode(events[start:stop], weights[start:stop]))
        return blobs

    def _row_type(self, dtype: np.dtype[Any]) -> Callable[..., Any] | None:
        if dtype not in self._row_types:
            names = dtype.names or ()
            simple = bool(names) and "weight" not in names
            simple = simple and all(_is_simple(dtype[n]) for n in names)
            row_type = None
            if simple:
                fields = [*names, "weight"]
                try:
                    row_type = msgspec.defstruct(
                        "JsonLinesRow",
                        [(f"f{i}", object) for i in range(len(fields))],
                        rename={f"f{i}": name for i, name in enumerate(fields)},
                        gc=False,
                    )
                except ValueError:  # a name msgspec will not take (quotes, control characters)
                    row_type = None
            self._row_types[dtype] = row_type
        return self._row_types[dtype]


def output_problem(path: str, *, create_parents: bool = False) -> None:
    """Raise ``ConfigError("path", ...)`` if ``path`` cannot be opened for appending."""
    if path == "-":
        return
    problem = appendable_problem(path, create_parents=create_parents)
    if problem is not None:
        raise ConfigError("path", f"cannot write: {problem}")


class JsonLinesSink(BatchSink):
    Config = JsonLinesConfig
    config: JsonLinesConfig

    def __init__(self, config: JsonLinesConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._encoder = JsonLinesEncoder()
        self._out: LineOutput | None = None

    @classmethod
    def resolve_config(cls, config: JsonLinesConfig, settings: Settings) -> JsonLinesConfig:
        output_problem(config.path)
        return config

    def _output(self) -> LineOutput:
        if self._out is None:
            if self.config.path == "-":
                sys.stdout.flush()
                self._out = LineOutput.inherited(sys.stdout.fileno(), "stdout")
            else:
                self._out = LineOutput.open(self.config.path)
        return self._out

    async def write(self, batch: Batch) -> None:
        blobs = await self._encoder.encode_batch(batch)
        await self._output().write(blobs)

    async def aclose(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            await out.aclose()
