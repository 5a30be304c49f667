"""The ring-buffer record parser against two models: what the producer wrote, and
a line-by-line port of libbpf's ``ringbuf_process_ring`` consume loop.

Buffers are built with the kernel's layout (8-byte headers, BUSY/DISCARD bits,
8-byte rounding, the data area mapped twice) at positions that wrap the ring and
sit near and beyond 2**32, with payloads crafted to look like headers so the
parser's run-guessing is attacked, not just exercised.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bpf.ringbuf import (
    BPF_RINGBUF_BUSY_BIT,
    BPF_RINGBUF_DISCARD_BIT,
    BPF_RINGBUF_HDR_SZ,
    RingBufferError,
    SimulatedRing,
    _walk,
    parse_records,
    record_size,
    skip_records,
)

COMMITTED, DISCARDED, BUSY = "committed", "discarded", "busy"


@dataclass(frozen=True)
class Rec:
    length: int
    state: str
    payload: bytes


def libbpf_consume(data: bytes, cons: int, prod: int, mask: int, max_records: int | None = None):
    """libbpf src/ringbuf.c ringbuf_process_ring, one pass, with a sample callback
    that stops after ``max_records`` samples. Returns (samples, cons, discarded)."""
    samples: list[bytes] = []
    discarded = 0
    while cons < prod:
        if max_records is not None and len(samples) == max_records:
            break
        index = cons & mask
        (length,) = struct.unpack_from("<I", data, index)
        if length & BPF_RINGBUF_BUSY_BIT:
            break
        cons += record_size(length)  # roundup_len(): clear the top bits, add header, round to 8
        if length & BPF_RINGBUF_DISCARD_BIT == 0:
            start = index + BPF_RINGBUF_HDR_SZ
            samples.append(data[start : start + length])
        else:
            discarded += 1
    return samples, cons, discarded


def expected_from_producer(records: list[Rec], cons: int, max_records: int | None = None):
    samples: list[bytes] = []
    discarded = 0
    blocked = False
    for rec in records:
        if max_records is not None and len(samples) == max_records:
            break
        if rec.state == BUSY:
            blocked = True
            break
        cons += record_size(rec.length)
        if rec.state == DISCARDED:
            discarded += 1
        else:
            samples.append(rec.payload)
    return samples, cons, discarded, blocked


def build_ring(size: int, cons: int, records: list[Rec], garbage: bytes) -> tuple[bytes, int]:
    """The double-mapped data area holding ``records`` from ``cons``; returns (data, prod)."""
    mem = bytearray((garbage * (size // len(garbage) + 1))[:size])
    pos = cons
    for rec in records:
        flags = {COMMITTED: 0, DISCARDED: BPF_RINGBUF_DISCARD_BIT, BUSY: BPF_RINGBUF_BUSY_BIT}[rec.state]
        record = struct.pack("<II", rec.length | flags, 0xDEAD) + rec.payload
        for i, byte in enumerate(record):
            mem[(pos + i) & (size - 1)] = byte
        pos += record_size(rec.length)
    return bytes(mem) * 2, pos


POSITIONS = st.sampled_from([0, 8, 2**31 - 64, 2**32 - 8, 2**32 - 256, 2**32, 2**40 + 4096, 2**63 - 2**20])


@st.composite
def rings(draw: st.DrawFn) -> tuple[int, int, list[Rec], bytes]:
    size = 1 << draw(st.integers(6, 11))
    base = draw(POSITIONS)
    cons = base + draw(st.integers(0, size // 8)) * 8  # any alignment within the ring: wraps
    # Few distinct lengths, in runs: what the parser's run-guessing is built for.
    lengths = draw(st.lists(st.sampled_from([0, 1, 4, 7, 8, 16, 20, 40]), min_size=1, max_size=3))
    records: list[Rec] = []
    used = 0
    for _ in range(draw(st.integers(0, 40))):
        length = draw(st.sampled_from(lengths)) if draw(st.booleans()) else draw(st.integers(0, 64))
        step = record_size(length)
        if used + step > size - 8:  # the kernel keeps the ring at least one byte short of full
            break
        state = draw(st.sampled_from([COMMITTED] * 6 + [DISCARDED, BUSY]))
        mimic = draw(st.booleans())
        if mimic:  # payload made of valid-looking headers
            word = struct.pack("<II", records[-1].length if records else length, 0)
            payload = (word * (length // 8 + 1))[:length]
        else:
            payload = draw(st.binary(min_size=length, max_size=length))
        records.append(Rec(length, state, payload))
        used += step
    garbage = draw(st.binary(min_size=8, max_size=16).filter(lambda b: len(b) % 8 == 0))
    return size, cons, records, garbage


def payloads(span_data: bytes, span, start: int) -> list[bytes]:
    return [
        span_data[start + int(o) : start + int(o) + int(n)]
        for o, n in zip(span.offsets, span.lengths, strict=True)
    ]


@given(rings(), st.one_of(st.none(), st.integers(0, 12)))
def test_parser_matches_producer_and_libbpf(ring, max_records):
    size, cons, records, garbage = ring
    data, prod = build_ring(size, cons, records, garbage)
    note(f"size={size} cons={cons} prod={prod} records={[(r.length, r.state) for r in records]}")

    span = parse_records(data, cons, prod, size - 1, max_records=max_records)
    got = payloads(data, span, span.start)

    want, want_cons, want_discarded, want_blocked = expected_from_producer(records, cons, max_records)
    assert got == want
    assert span.consumer_pos == want_cons
    assert span.discarded == want_discarded
    assert span.blocked == want_blocked
    assert span.start == cons & (size - 1)
    assert span.size_bytes == want_cons - cons
    assert span.lengths.tolist() == [len(p) for p in want]
    assert all(int(o) % 8 == 0 for o in span.offsets)

    lib_samples, lib_cons, lib_discarded = libbpf_consume(data, cons, prod, size - 1, max_records)
    assert got == lib_samples
    assert span.consumer_pos == lib_cons
    assert span.discarded == lib_discarded

    # The offsets index the span copied out in one slice, as RingBuffer.read_batch does.
    copied = data[span.start : span.start + span.size_bytes]
    assert payloads(copied, span, 0) == want


@given(rings(), st.one_of(st.none(), st.integers(0, 12)), st.one_of(st.none(), st.integers(0, 2048)))
def test_skip_matches_model(ring, max_records, min_bytes):
    size, cons, records, garbage = ring
    data, prod = build_ring(size, cons, records, garbage)
    result = skip_records(data, cons, prod, size - 1, max_records=max_records, min_bytes=min_bytes)

    pos, skipped, discarded, blocked = cons, 0, 0, False
    for rec in records:
        if max_records is not None and skipped == max_records:
            break
        if min_bytes is not None and pos - cons >= min_bytes:
            break
        if rec.state == BUSY:
            blocked = True
            break
        pos += record_size(rec.length)
        if rec.state == DISCARDED:
            discarded += 1
        else:
            skipped += 1
    assert (result.records, result.discarded, result.consumer_pos, result.blocked) == (
        skipped,
        discarded,
        pos,
        blocked,
    )
    assert result.size_bytes == pos - cons
    # Skipping then parsing sees exactly the records after the skipped ones.
    rest = parse_records(data, result.consumer_pos, prod, size - 1)
    want, _, _, _ = expected_from_producer(records, cons)
    assert payloads(data, rest, rest.start) == want[skipped:]


@given(st.integers(6, 12), POSITIONS, st.integers(1, 200))
def test_long_uniform_runs_wrap_and_cross_2_32(log_size, base, count):
    """Uniform records (the run-guessing fast path) laid over the wrap point."""
    size = 1 << log_size
    length = 24
    step = record_size(length)
    count = min(count, (size - 8) // step)
    cons = base - (base & (size - 1)) + size - step * (count // 2)  # the wrap falls mid-batch
    records = [Rec(length, COMMITTED, bytes([i % 251]) * length) for i in range(count)]
    data, prod = build_ring(size, cons, records, b"\xff" * 8)
    span = parse_records(data, cons, prod, size - 1)
    assert payloads(data, span, span.start) == [r.payload for r in records]
    assert span.consumer_pos == prod
    assert not span.blocked
    # However many guesses the walk took, equal records make one run (one arange).
    walk = _walk(
        np.frombuffer(data, dtype=np.uint32),
        cons,
        prod,
        size - 1,
        max_records=None,
        min_bytes=None,
        collect=True,
    )
    assert walk.ks == [count]


def test_empty_and_inconsistent_positions():
    data = bytes(128)
    span = parse_records(data, 64, 64, 63)
    assert span.records == 0 and span.size_bytes == 0 and not span.blocked
    with pytest.raises(RingBufferError, match="not within one ring"):
        parse_records(data, 0, 72, 63)
    with pytest.raises(RingBufferError, match="not within one ring"):
        parse_records(data, 64, 8, 63)
    with pytest.raises(RingBufferError, match="aligned"):
        parse_records(data, 4, 8, 63)
    with pytest.raises(RingBufferError, match="double-mapped"):
        parse_records(bytes(64), 0, 8, 63)
    # A header that claims more bytes than the producer has published.
    bad = bytearray(128)
    bad[0:4] = struct.pack("<I", 40)
    with pytest.raises(RingBufferError, match="past producer"):
        parse_records(bytes(bad), 0, 16, 63)
    with pytest.raises(ValueError, match="max_records"):
        parse_records(data, 0, 0, 63, max_records=-1)


def test_record_size_rounds_and_ignores_flags():
    assert record_size(0) == 8
    assert record_size(1) == 16
    assert record_size(8) == 16
    assert record_size(9) == 24
    assert record_size(40 | BPF_RINGBUF_BUSY_BIT) == 48
    assert record_size(40 | BPF_RINGBUF_DISCARD_BIT) == 48


class SimulatedRingMachine(RuleBasedStateMachine):
    """Out-of-order commits from several 'CPUs', reads, skips: against a model."""

    @initialize(log_size=st.integers(6, 10), base=POSITIONS)
    def setup(self, log_size, base):
        self.ring = SimulatedRing(1 << log_size, start_pos=base)
        self.pending: deque[list] = deque()  # [pos, payload, state] in reservation order
        self.received: list[bytes] = []
        self.expected_done: list[bytes] = []  # committed records the reader passed over, in order
        self.next_id = 0

    def teardown(self):
        self.ring.close()

    @rule(length=st.integers(0, 48))
    def reserve(self, length):
        payload = (self.next_id.to_bytes(4, "little") * 13)[:length]
        self.next_id += 1
        usage_before = self.ring.unconsumed_bytes()
        pos = self.ring.reserve(length)
        if pos is None:
            assert usage_before + record_size(length) > self.ring.size_bytes - 1
            return
        self.ring.write(pos, payload)
        self.pending.append([pos, payload, BUSY])

    @precondition(lambda self: any(r[2] == BUSY for r in self.pending))
    @rule(data=st.data(), discard=st.booleans())
    def commit_any(self, data, discard):
        busy = [r for r in self.pending if r[2] == BUSY]
        rec = data.draw(st.sampled_from(busy))
        self.ring.commit(rec[0], discard=discard)
        rec[2] = DISCARDED if discard else COMMITTED

    def _committed_prefix(self, limit=None, min_bytes=None):
        taken, nbytes = [], 0
        for pos, payload, state in self.pending:
            if state == BUSY:
                break
            if limit is not None and sum(1 for t in taken if t[2] == COMMITTED) == limit:
                break
            if min_bytes is not None and nbytes >= min_bytes:
                break
            taken.append((pos, payload, state))
            nbytes += record_size(len(payload))
        return taken

    @rule(max_records=st.one_of(st.none(), st.integers(0, 5)))
    def read(self, max_records):
        taken = self._committed_prefix(limit=max_records)
        batch = self.ring.read_batch(max_records)
        got = [
            bytes(batch.raw[int(o) : int(o) + int(n)])
            for o, n in zip(batch.offsets, batch.lengths, strict=True)
        ]
        assert got == [p for _, p, s in taken if s == COMMITTED]
        assert batch.discarded == sum(1 for t in taken if t[2] == DISCARDED)
        for _ in taken:
            self.pending.popleft()
        self.received += got

    @rule(
        max_records=st.one_of(st.none(), st.integers(0, 5)),
        min_bytes=st.one_of(st.none(), st.integers(0, 200)),
    )
    def skip(self, max_records, min_bytes):
        taken = self._committed_prefix(limit=max_records, min_bytes=min_bytes)
        result = self.ring.skip(max_records=max_records, min_bytes=min_bytes)
        assert result.records == sum(1 for t in taken if t[2] == COMMITTED)
        assert result.discarded == sum(1 for t in taken if t[2] == DISCARDED)
        for _ in taken:
            self.pending.popleft()

    @invariant()
    def positions_agree(self):
        if not hasattr(self, "ring"):
            return
        in_ring = sum(record_size(len(p)) for _, p, _ in self.pending)
        assert self.ring.unconsumed_bytes() == in_ring
        assert 0 <= self.ring.usage() < 1
        if self.pending:
            assert self.ring.consumer_pos == self.pending[0][0]


TestSimulatedRing = SimulatedRingMachine.TestCase


def test_max_records_zero_reads_nothing_but_stays_consistent():
    ring = SimulatedRing(64)
    ring.produce([b"abc"])
    assert ring.read_batch(0).records == 0
    batch = ring.read_batch()
    assert batch.records == 1 and bytes(batch.raw[8:11]) == b"abc"
    ring.close()


def test_discard_only_ring_advances():
    ring = SimulatedRing(128)
    for _ in range(3):
        pos = ring.reserve(5)
        assert pos is not None
        ring.commit(pos, discard=True)
    batch = ring.read_batch()
    assert batch.records == 0 and batch.discarded == 3
    assert ring.unconsumed_bytes() == 0
    ring.close()


def test_words_view_accepted_without_copy():
    size = 256
    records = [Rec(16, COMMITTED, bytes(range(16)))] * 5
    data, prod = build_ring(size, 2**32 - 40, records, b"\0" * 8)
    words = np.frombuffer(data, dtype=np.uint32)
    span = parse_records(words, 2**32 - 40, prod, size - 1)
    assert span.records == 5
    assert payloads(data, span, span.start) == [r.payload for r in records]
