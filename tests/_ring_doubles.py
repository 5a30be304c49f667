"""Test doubles for ring-buffer readers: a simulated BPF program and a reader that loads it.

``FakeProgram`` plays the BPF side with the kernel's rules: every run counts an
event, passes a sampling gate (1 in ``rate``), reserves space in a
:class:`~bpf.ringbuf.SimulatedRing` (a reservation that does not fit counts as
``lost_reserve``), counts ``emitted`` *before* committing, and can be caught
mid-run (:meth:`FakeProgram.begin`: the event counted, its record still BUSY).
Each event's ``seq`` is its index among *all* events the program saw, so the
delivered ``seq`` values show exactly which events were lost.

``reader_for(program)`` is a :class:`~stages.reader.RingBufferReader` subclass
that "loads" ``program`` (or calls a function that loads one, in the reader's
worker thread, as the real loader runs) and reads a ``FakeProgram``'s simulated
ring instead of mapping one.

Importable from ``tests/unit`` and ``tests/integration`` alike: pytest's default
(``prepend``) import mode puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bpf.ringbuf import SimulatedRing
from stages.reader import ReadableRing, RingBufferReader, RingProgram

__all__ = ["EVENT", "HEADER", "RECORD_BYTES", "FakeProgram", "reader_for"]

HEADER = np.dtype([("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")])
EVENT = np.dtype([*HEADER.descr, ("seq", "<u8")])
RECORD_BYTES = 32  # the 24-byte event and the ring's 8-byte header


class FakeProgram:
    """A BPF program over a :class:`SimulatedRing` of ``ring_size`` bytes, emitting
    one event type (``EVENT``, type id 1) and kept 1 in ``rate`` by its gate."""

    name = "fake"
    ring_map_fd = -1

    def __init__(self, ring_size: int = 1 << 14, *, rate: int = 1, seed: int = 0) -> None:
        self.ring = SimulatedRing(ring_size)
        self.ring_size_bytes = ring_size
        self.event_types = {1: EVENT}
        self.event_names = {1: "fake"}
        self.header_dtype = HEADER
        self.events = self.sampled_out = self.lost_reserve = self.emitted = 0
        self.rate = rate
        self.attached = True
        self.closed = False
        self._rng = np.random.default_rng(seed)

    # -- the kernel side ----------------------------------------------------------------
    def begin(self) -> int | None:
        """One program run up to its reservation: the event is counted, its record BUSY.
        Returns the record's position, or None if the event was sampled out or lost."""
        assert self.attached, "event after detach"
        seq = self.events
        self.events += 1
        if self.rate > 1 and self._rng.integers(self.rate) != 0:
            self.sampled_out += 1
            return None
        pos = self.ring.reserve(EVENT.itemsize)
        if pos is None:
            self.lost_reserve += 1
            return None
        event = np.zeros(1, dtype=EVENT)
        event["type"] = 1
        event["rate"] = self.rate
        event["seq"] = seq
        self.ring.write(pos, event.tobytes())
        return pos

    def finish(self, pos: int | None) -> None:
        """The rest of the run ``begin`` started: count ``emitted``, then commit."""
        if pos is not None:
            self.emitted += 1  # counted before submit
            self.ring.commit(pos)

    def fire(self, n: int) -> None:
        """``n`` program runs, back to back (no checkpoint: the reader cannot run meanwhile)."""
        for _ in range(n):
            self.finish(self.begin())

    # -- the loader's interface ---------------------------------------------------------
    def kernel_stats(self) -> dict[str, int]:
        return {
            "events": self.events,
            "sampled_out": self.sampled_out,
            "lost_reserve": self.lost_reserve,
            "emitted": self.emitted,
            "processed": self.events,
            "dropped": 0,
            "errors": 0,
        }

    def detach(self) -> None:
        self.attached = False

    def close(self) -> None:
        self.attached = False
        self.closed = True


def reader_for(program: RingProgram | Callable[[], RingProgram]) -> type[RingBufferReader]:
    """A reader of ``program``: the program itself, or a function that loads one. A
    ``FakeProgram``'s ring is its simulated one; any other program's is mapped."""

    class TestReader(RingBufferReader):
        def load_program(self) -> RingProgram:
            return program() if callable(program) else program

        def open_ring(self, loaded: RingProgram) -> ReadableRing:
            if isinstance(loaded, FakeProgram):
                return loaded.ring
            return super().open_ring(loaded)

    return TestReader
