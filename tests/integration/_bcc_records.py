"""Read a loaded program's ring buffer with bcc's own consumer (independent of
bpfpipe's reader), decoding each record with the loader's dtypes."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bpf.loader import LoadedProgram


class BccRecords:
    def __init__(self, program: LoadedProgram) -> None:
        self.program = program
        self.records: list[np.void] = []
        program.bpf[b"events"].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        raw = ctypes.string_at(data, size)
        header = np.frombuffer(raw, self.program.header_dtype, count=1)[0]
        dtype = self.program.event_types[int(header["type"])]
        assert size >= dtype.itemsize
        self.records.append(np.frombuffer(raw[: dtype.itemsize], dtype, count=1)[0])
        return 0

    def poll_until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            self.program.bpf.ring_buffer_poll(50)

    def take(self, count: int, timeout_s: float = 3.0) -> list[np.void]:
        """Wait for ``count`` records (or the timeout), then hand over all read so far."""
        self.poll_until(lambda: len(self.records) >= count, timeout_s)
        self.program.bpf.ring_buffer_consume()
        taken, self.records = self.records, []
        return taken
