"""The ring-buffer reader against a real kernel.

A tiny self-contained BPF program (below) writes numbered events from the
``syscalls:sys_enter_getppid`` tracepoint — only for this test process, K per
call — so each test controls exactly how many events the kernel produces by
calling ``os.getppid()``. It uses bpfpipe.h's gate/reserve/submit helpers, so
its counters follow the same rules as the real programs.

bcc only rewrites map calls (``events.ringbuf_reserve(...)``) in the main
source text, not in ``#include``d files, so the shared header is prepended to
the program text rather than included.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from _ring_doubles import reader_for

from bpf.ringbuf import RingBuffer
from pipeline import NodeSpec, Outcome, Pipeline
from pipeline.testing import TestingSink
from stages.decoder import Decoder, decode_records
from stages.raw_records import EventSchema, raw_batch
from stages.reader import RingBufferReader, RingBufferReaderConfig

pytestmark = pytest.mark.bpf

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

SEQGEN = r"""
struct seq_event {
    struct bpfpipe_hdr hdr;
    u64 seq;
    u32 tgid;
    u32 index;
    char comm[16];
};

struct tick_event {
    struct bpfpipe_hdr hdr;
    u64 seq;
};

/* [0] tgid to follow, [1] events per getppid() call, [2] every n-th event is a tick (0: never) */
BPF_ARRAY(seqgen_config, u32, 3);
BPF_ARRAY(seqgen_next, u64, 1);

#define SEQGEN_MAX_PER_CALL 64

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 k0 = 0, k1 = 1, k2 = 2;
    u32 *tgid = seqgen_config.lookup(&k0);
    u32 *per_call = seqgen_config.lookup(&k1);
    u32 *tick_every = seqgen_config.lookup(&k2);
    u64 *next = seqgen_next.lookup(&k0);
    if (!tgid || !per_call || !tick_every || !next)
        return 0;
    u32 me = bpf_get_current_pid_tgid() >> 32;
    if (me != *tgid)
        return 0;
    u32 n = *per_call;
    u32 every = *tick_every;
    for (u32 i = 0; i < SEQGEN_MAX_PER_CALL; i++) {
        if (i >= n)
            break;
        u32 rate = bpfpipe_gate();
        if (!rate)
            continue;
        u64 seq = __sync_fetch_and_add(next, 1);
        if (every && seq % every == every - 1) {
            struct tick_event *t = bpfpipe_reserve(sizeof(*t));
            if (!t)
                continue;
            bpfpipe_fill_hdr(&t->hdr, 2, rate);
            t->seq = seq;
            bpfpipe_submit(t);
            continue;
        }
        struct seq_event *e = bpfpipe_reserve(sizeof(*e));
        if (!e)
            continue;
        bpfpipe_fill_hdr(&e->hdr, 1, rate);
        e->seq = seq;
        e->tgid = me;
        e->index = i;
        bpf_get_current_comm(&e->comm, sizeof(e->comm));
        bpfpipe_submit(e);
    }
    return 0;
}
"""

HEADER = np.dtype([("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")])
SEQ_EVENT = np.dtype([*HEADER.descr, ("seq", "<u8"), ("tgid", "<u4"), ("index", "<u4"), ("comm", "S16")])
TICK_EVENT = np.dtype([*HEADER.descr, ("seq", "<u8")])
STAT_NAMES = ("events", "sampled_out", "lost_reserve", "emitted", "processed", "dropped", "errors")
TRACEPOINT = b"syscalls:sys_enter_getppid"


class SeqGenProgram:
    """The loader's ``LoadedProgram`` interface over the embedded program."""

    name = "seqgen"

    def __init__(self, *, ring_pages: int, per_call: int, tick_every: int = 0, sample_rate: int = 1) -> None:
        from bcc import BPF

        self.bpf = BPF(
            text=((BPF_DIR / "bpfpipe.h").read_text() + SEQGEN).encode(),
            cflags=[f"-I{BPF_DIR}", f"-DBPFPIPE_RINGBUF_PAGES={ring_pages}"],
        )
        self.ring_size_bytes = ring_pages * mmap.PAGESIZE
        self.ring_map_fd = self.bpf[b"events"].map_fd
        self.event_types = {1: SEQ_EVENT, 2: TICK_EVENT}
        self.event_names = {1: "seq", 2: "tick"}
        self.header_dtype = HEADER
        config = self.bpf[b"seqgen_config"]
        for key, value in enumerate((os.getpid(), per_call, tick_every)):
            config[ct.c_int(key)] = ct.c_uint32(value)
        self.bpf[b"bpfpipe_rate"][ct.c_int(0)] = ct.c_uint32(sample_rate)

    def kernel_stats(self) -> dict[str, int]:
        stats = self.bpf[b"bpfpipe_stats"]
        # Fates first, ``events`` last: a concurrent run can only make events look ahead.
        values = {name: stats.sum(ct.c_int(i)).value for i, name in reversed(list(enumerate(STAT_NAMES)))}
        return {name: values[name] for name in STAT_NAMES}

    def detach(self) -> None:
        if TRACEPOINT in self.bpf.tracepoint_fds:
            self.bpf.detach_tracepoint(TRACEPOINT)

    def close(self) -> None:
        self.bpf.cleanup()

    @property
    def attached(self) -> bool:
        return bool(self.bpf.tracepoint_fds)


@pytest.fixture
def seqgen() -> Iterator[Callable[..., SeqGenProgram]]:
    programs: list[SeqGenProgram] = []

    def make(**kwargs: Any) -> SeqGenProgram:
        program = SeqGenProgram(**kwargs)
        programs.append(program)
        return program

    yield make
    for program in programs:
        program.close()
        assert not program.attached


def schema(program: SeqGenProgram) -> EventSchema:
    return EventSchema(program.event_types, program.event_names, program.header_dtype)


def test_every_event_read_once_in_order_across_ring_wraps(seqgen):
    program = seqgen(ring_pages=4, per_call=8)  # 16 KiB: 292 records of 56 bytes
    seen: list[int] = []
    with RingBuffer(program.ring_map_fd, program.ring_size_bytes) as ring:
        for _ in range(8):  # 1920 events: the ring wraps about 6 times
            for _ in range(30):
                os.getppid()
            read = ring.read_batch()
            assert read.records == 240
            assert read.lengths.tolist() == [SEQ_EVENT.itemsize] * 240  # the dtype matches clang's layout
            [events] = decode_records(raw_batch(read, schema(program))).batches
            assert events.events["tgid"].tolist() == [os.getpid()] * 240
            assert events.events["index"].tolist() == list(range(8)) * 30
            seen += events.events["seq"].tolist()
            assert ring.usage() == 0.0
        assert ring.consumer_pos == 1920 * 56
    assert seen == list(range(1920))
    stats = program.kernel_stats()
    assert stats["events"] == stats["emitted"] == 1920
    assert stats["lost_reserve"] == stats["sampled_out"] == 0


async def test_wait_readable_wakes_when_the_kernel_commits(seqgen):
    program = seqgen(ring_pages=4, per_call=1)
    with RingBuffer(program.ring_map_fd, program.ring_size_bytes) as ring:
        assert ring.read_batch().records == 0

        async def produce_later() -> None:
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(os.getppid)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce_later)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(ring.fileno())
        assert trio.current_time() - start >= 0.2  # it slept: the ring was empty
        assert ring.read_batch().records == 1
        trio.lowlevel.notify_closing(ring.fileno())


async def run_rounds(pipe: Pipeline, rounds: int, calls: int, delivered_after: Callable[[int], int]) -> None:
    """Start the pipeline; per round, call getppid() ``calls`` times without yielding
    to the reader, then wait until ``delivered_after(round)`` events were delivered."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        for round_ in range(rounds):
            for _ in range(calls):
                os.getppid()
            with trio.fail_after(10):
                while pipe.ledger.snapshot().total(Outcome.DELIVERED) < delivered_after(round_):
                    await trio.sleep(0.005)
        pipe.stop()


async def test_reader_and_decoder_deliver_every_event_in_order(seqgen):
    programs: list[SeqGenProgram] = []

    def make() -> SeqGenProgram:
        programs.append(seqgen(ring_pages=8, per_call=16, tick_every=5))
        return programs[-1]

    specs = [
        NodeSpec("reader", reader_for(make), RingBufferReaderConfig(program="seqgen", idle_poll_s=5.0)),
        NodeSpec("decoder", Decoder),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [4, 4])
    rounds, calls = 12, 30  # 480 events (about 24 KiB) a round; the 32 KiB ring wraps 5 times
    total = rounds * calls * 16
    await run_rounds(pipe, rounds, calls, lambda round_: (round_ + 1) * calls * 16)

    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    by_type: dict[int, list[int]] = {1: [], 2: []}
    for batch in sink.batches:
        types = set(batch.events["type"].tolist())
        assert len(types) == 1  # one event type per decoded batch
        by_type[types.pop()] += batch.events["seq"].tolist()
    assert sorted(by_type[1] + by_type[2]) == list(range(total))
    assert by_type[1] == sorted(by_type[1]) and by_type[2] == sorted(by_type[2])
    assert by_type[2] == list(range(4, total, 5))

    [program] = programs
    assert not program.attached  # detached at shutdown
    snap = pipe.ledger.snapshot()
    assert snap.produced == snap.total(Outcome.DELIVERED) == total
    assert snap.pending == 0
    reader = pipe.nodes[0]
    assert isinstance(reader, RingBufferReader)
    stats = reader.statistics()
    assert stats.kernel.events == stats.kernel.emitted == total
    assert stats.wakeups >= rounds // 2  # woken by the ring, not the 5 s idle poll
    assert stats.idle_timeouts <= 2 * rounds  # (counter reads due also end waits)


async def test_sampled_and_lost_events_balance_against_kernel_counters(seqgen):
    programs: list[SeqGenProgram] = []

    def make() -> SeqGenProgram:
        # One page: 73 records. Sampling 1 in 2; bursts of 2048 events overflow it.
        programs.append(seqgen(ring_pages=1, per_call=64, sample_rate=2))
        return programs[-1]

    specs = [
        NodeSpec("reader", reader_for(make), RingBufferReaderConfig(program="seqgen")),
        NodeSpec("decoder", Decoder),
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [4, 4])

    await run_rounds(pipe, 3, 32, lambda round_: programs[0].kernel_stats()["emitted"])

    [program] = programs
    reader = pipe.nodes[0]
    assert isinstance(reader, RingBufferReader)
    kernel = reader.statistics().kernel
    assert kernel.events == 3 * 32 * 64
    assert kernel.sampled_out > 0 and kernel.lost_reserve > 0
    snap = pipe.ledger.snapshot()
    assert snap.produced == kernel.events
    assert snap.total(Outcome.KERNEL_SAMPLED_OUT) == kernel.sampled_out
    assert snap.total(Outcome.LOST_ON_RESERVE) == kernel.lost_reserve
    assert snap.total(Outcome.DELIVERED) == kernel.emitted
    assert snap.total_weight(Outcome.DELIVERED) == 2.0 * kernel.emitted  # each stands for 2
    pipe.ledger.check_conserved()
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    seqs = [s for b in sink.batches for s in b.events["seq"].tolist()]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert not program.attached


async def test_reader_loads_the_program_through_the_loader():
    """The default load path: bpf.loader's ``loadgen`` program, its derived dtypes."""
    config = RingBufferReaderConfig(program="loadgen", ring_buffer_size=1 << 16)
    pipe = Pipeline(
        [
            NodeSpec("reader", RingBufferReader, config),
            NodeSpec("decoder", Decoder),
            NodeSpec("sink", TestingSink),
        ],
        [4, 4],
    )
    per_call, calls, rounds = 8, 100, 4  # 800 records of 40 bytes a round: 32 KiB of a 64 KiB ring
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        reader = pipe.nodes[0]
        assert isinstance(reader, RingBufferReader)
        program: Any = reader.program
        assert program is not None and program.ring_size_bytes == 1 << 16
        program.configure_loadgen(os.getpid(), per_call)
        for round_ in range(rounds):
            for _ in range(calls):
                os.getppid()
            with trio.fail_after(10):
                while pipe.ledger.snapshot().total(Outcome.DELIVERED) < (round_ + 1) * calls * per_call:
                    await trio.sleep(0.005)
        pipe.stop()
    assert program.closed
    total = rounds * calls * per_call
    snap = pipe.ledger.snapshot()
    assert snap.produced == snap.total(Outcome.DELIVERED) == total and snap.pending == 0
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    events = np.concatenate([b.events for b in sink.batches])
    assert events.dtype.names == ("type", "cpu", "rate", "ts_ns", "seq", "payload")
    assert (events["payload"] >> 32 == os.getpid()).all()
    assert (
        np.bincount((events["payload"] & 0xFFFFFFFF).astype(np.int64)).tolist()
        == [total // per_call] * per_call
    )
    for cpu in np.unique(events["cpu"]):  # loadgen numbers events per CPU
        seq = events["seq"][events["cpu"] == cpu]
        assert (np.diff(seq.astype(np.int64)) > 0).all()
