"""The in-kernel sampling gate and the kernel-side conservation law, driven by loadgen.

Only this process's getppid() calls produce events, so the counts are known
exactly: EVENTS == SAMPLED_OUT + LOST_RESERVE + EMITTED must hold to the event,
per CPU and in total, and every emitted event must be readable from the ring.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from bpf.loader import LoadgenProgram, load_program

pytestmark = pytest.mark.bpf

EVENT_LOADGEN = 4  # enum loadgen_event_type in loadgen.h


class Records:
    def __init__(self, program: LoadgenProgram) -> None:
        self.program = program
        self.dtype = program.event_types[EVENT_LOADGEN]
        self.chunks: list[bytes] = []
        program.bpf[b"events"].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        assert size == self.dtype.itemsize
        self.chunks.append(ctypes.string_at(data, size))
        return 0

    def drain(self) -> np.ndarray:
        before = -1
        while before != len(self.chunks):
            before = len(self.chunks)
            self.program.bpf.ring_buffer_consume()
        return np.frombuffer(b"".join(self.chunks), self.dtype)


def generate(program: LoadgenProgram, calls: int, per_call: int) -> None:
    program.configure_loadgen(os.getpid(), per_call)
    try:
        for _ in range(calls):
            os.getppid()
    finally:
        program.configure_loadgen(0, 0)


def assert_conserved(program: LoadgenProgram) -> dict[str, int]:
    for cpu in program.kernel_stats_per_cpu():
        assert cpu["events"] == cpu["sampled_out"] + cpu["lost_reserve"] + cpu["emitted"], cpu
    stats = program.kernel_stats()
    assert stats["events"] == stats["sampled_out"] + stats["lost_reserve"] + stats["emitted"], stats
    return stats


def test_loadgen_event_layout() -> None:
    with load_program("loadgen", ring_buffer_size=4096, map_size=1024) as program:
        assert program.event_names == {EVENT_LOADGEN: "loadgen", 255: "heartbeat"}
        dtype = program.event_types[EVENT_LOADGEN]
        assert dtype.names == ("type", "cpu", "rate", "ts_ns", "seq", "payload")
        assert dtype.itemsize == 32
        assert isinstance(program, LoadgenProgram)
        with pytest.raises(ValueError, match=r"events per call must be in 0\.\.64"):
            program.configure_loadgen(os.getpid(), 65)
        with pytest.raises(ValueError, match="sample rate"):
            program.set_sample_rate(0)


def test_gate_keeps_one_in_n_within_five_sigma() -> None:
    rate, calls, per_call = 10, 2000, 50
    total = calls * per_call
    # 4 MiB holds every kept record (~10k x 40 bytes) with room to spare: nothing is lost.
    with load_program("loadgen", ring_buffer_size=4 << 20, map_size=1024) as program:
        assert isinstance(program, LoadgenProgram)
        records = Records(program)
        program.set_sample_rate(rate)
        assert program.sample_rate() == rate
        generate(program, calls, per_call)
        kept = records.drain()
        stats = assert_conserved(program)

        assert stats["events"] == total
        assert stats["processed"] == calls
        assert stats["lost_reserve"] == 0
        assert stats["emitted"] == len(kept)
        mean, sigma = total / rate, math.sqrt(total * (1 / rate) * (1 - 1 / rate))
        assert abs(len(kept) - mean) <= 5 * sigma, (len(kept), mean, sigma)

        assert (kept["type"] == EVENT_LOADGEN).all()
        assert (kept["rate"] == rate).all()
        assert ((kept["payload"] >> np.uint64(32)) == os.getpid()).all()
        assert ((kept["payload"] & np.uint64(0xFFFFFFFF)) < per_call).all()
        # seq counts produced events per CPU: strictly increasing, below that CPU's EVENTS.
        per_cpu = program.kernel_stats_per_cpu()
        by_cpu: dict[int, list[int]] = defaultdict(list)
        for cpu, seq in zip(kept["cpu"].tolist(), kept["seq"].tolist(), strict=True):
            by_cpu[cpu].append(seq)
        for cpu, seqs in by_cpu.items():
            assert seqs == sorted(set(seqs))
            assert seqs[-1] < per_cpu[cpu]["events"]


def test_conservation_holds_exactly_when_the_ring_overflows() -> None:
    rate, calls, per_call = 2, 200, 64
    # One page holds ~100 records: most kept events find the ring full.
    with load_program("loadgen", ring_buffer_size=4096, map_size=1024) as program:
        assert isinstance(program, LoadgenProgram)
        assert program.ring_size_bytes == 4096
        records = Records(program)
        program.set_sample_rate(rate)
        generate(program, calls, per_call)
        stats = assert_conserved(program)
        assert stats["events"] == calls * per_call
        assert stats["sampled_out"] > 0 and stats["lost_reserve"] > 0 and stats["emitted"] > 0
        kept = records.drain()
        assert len(kept) == stats["emitted"]
        assert (kept["rate"] == rate).all()
        assert assert_conserved(program) == stats  # reading the ring changes no counter
