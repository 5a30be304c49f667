"""The heartbeat on the real kernel: made in the kernel, carried by the source's own ring
buffer through every stage, consumed before the sink, and never sampled.

The exec program is loaded by the pipeline under test (its reader), so the heartbeat
goes the whole way an exec event goes: tracepoint -> ring buffer -> reader -> decoder
-> a plug-in stage -> the adaptive sampler -> the sink observer.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import trio
from _stage_doubles import RecordsEventNames, Stall

from bpf.loader import load_program
from bpf.ringbuf import RingBuffer
from pipeline import HEARTBEAT_EVENT, NodeSpec, Outcome, Pipeline
from pipeline.health import HealthMonitor, Readiness
from pipeline.ring_accounting import KernelCounters
from pipeline.testing import TestingSink, settings, wait_until
from stages.decoder import Decoder
from stages.programs import ExecConfig, ExecSource
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig

pytestmark = pytest.mark.bpf

HEARTBEAT_TYPE = 255  # BPFPIPE_EVENT_HEARTBEAT in bpfpipe_types.h


def exec_pipeline(*stages: NodeSpec, interval_s: float, deadline_s: float) -> tuple[Pipeline, HealthMonitor]:
    config = settings(health={"heartbeat_interval_s": interval_s, "heartbeat_deadline_s": deadline_s})
    monitor = HealthMonitor(config)
    specs = [
        NodeSpec("exec", ExecSource, ExecConfig(ring_buffer_size=256 * 1024, map_size=1024)),
        NodeSpec("exec.decoder", Decoder),
        *stages,
        NodeSpec("sink", TestingSink),
    ]
    pipe = Pipeline(specs, [8] * (len(specs) - 1), settings=config, helpers=[monitor.run])
    return pipe, monitor


def heartbeat_check(result: Readiness) -> dict[str, Any]:
    (check,) = [c for c in result.details if c.name == "heartbeat"]
    return check.as_dict()


async def test_heartbeats_flow_through_an_exec_pipeline_and_never_reach_the_sink() -> None:
    RecordsEventNames.seen = []
    pipe, monitor = exec_pipeline(
        NodeSpec("sees", RecordsEventNames),
        # N = 1000 from the start: exec events are sampled (in the kernel), heartbeats never
        NodeSpec("sampler", AdaptiveSampler, AdaptiveSamplerConfig(min_sample_rate=1000, seed=3)),
        interval_s=0.05,
        deadline_s=5.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await wait_until(
            lambda: "exec" in monitor.trackers and monitor.trackers["exec"].seen >= 20, timeout=20
        )
        for _ in range(5):  # some exec events meanwhile, to be sampled
            await trio.run_process(["/bin/true"])
        result = await monitor.check(pipe)
        assert result.status == 200, result.as_dict()
        pipe.stop()
    stats = monitor.statistics()["exec"]
    assert stats.missed == 0 and stats.unexpected == 0
    assert stats.last_round_trip_s is not None
    assert set(RecordsEventNames.seen) <= {"exec", "exit"}  # process() never saw a heartbeat
    sink = pipe.nodes[-1]
    assert isinstance(sink, TestingSink)
    assert all(b.event_name != HEARTBEAT_EVENT for b in sink.batches)

    ledger = pipe.ledger.snapshot()
    pipe.ledger.check_conserved()
    assert ledger.total(Outcome.HEARTBEAT) == stats.seen  # each one seen, recorded once
    assert ledger.total(Outcome.KERNEL_SAMPLED_OUT) >= 1  # the gate sampled exec events...
    reader = pipe.nodes[0]
    assert isinstance(reader, ExecSource)
    kernel = reader.statistics().kernel
    # ...and the kernel's own books balance, heartbeats included
    assert kernel.events == kernel.sampled_out + kernel.lost_reserve + kernel.emitted
    assert kernel.emitted >= stats.seen


async def test_a_stalled_stage_fails_the_heartbeat_check_and_it_recovers() -> None:
    pipe, monitor = exec_pipeline(NodeSpec("stall", Stall), interval_s=0.2, deadline_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        await wait_until(
            lambda: "exec" in monitor.trackers and monitor.trackers["exec"].seen >= 1, timeout=20
        )
        assert (await monitor.check(pipe)).status == 200
        Stall.released = trio.Event()
        failed: Readiness | None = None
        with trio.fail_after(20):
            while failed is None:
                result = await monitor.check(pipe)
                if result.status == 503:
                    failed = result
                await trio.sleep(0.05)
        check = heartbeat_check(failed)
        assert check["healthy"] is False and check["critical"] is True
        assert "has not left the last stage" in check["message"], check
        assert "past the 1 s deadline" in check["message"], check
        assert [c.name for c in failed.details if not c.healthy] in (
            ["heartbeat"],
            ["event_processing", "heartbeat"],  # an idle machine may also have had no exec
        )
        Stall.released.set()
        await wait_until(lambda: not monitor.trackers["exec"].outstanding, timeout=20)
        result = await monitor.check(pipe)
        assert result.status == 200, result.as_dict()
        assert heartbeat_check(result)["healthy"] is True
        pipe.stop()
    pipe.ledger.check_conserved()


def test_the_kernel_never_samples_a_heartbeat_and_counts_it() -> None:
    with load_program("loadgen", ring_buffer_size=64 * 1024, map_size=1024) as program:
        assert program.event_names[HEARTBEAT_TYPE] == "heartbeat"
        assert program.event_types[HEARTBEAT_TYPE].names == ("type", "cpu", "rate", "ts_ns", "marker", "tgid")
        program.set_sample_rate(1_000_000)
        heartbeat = program.heartbeat
        assert heartbeat is not None
        ring = RingBuffer(program.ring_map_fd, program.ring_size_bytes)
        try:
            for marker in range(100, 120):
                heartbeat.trigger_heartbeat(marker)
            with pytest.raises(OSError):
                os.getpriority(heartbeat.key + 1, 999)  # another key: not ours, no record
            read = ring.read_batch()
            dtype = program.event_types[HEARTBEAT_TYPE]
            records = np.array(
                [np.frombuffer(read.raw[o : o + dtype.itemsize].tobytes(), dtype)[0] for o in read.offsets]
            )
        finally:
            ring.close()
        assert records["type"].tolist() == [HEARTBEAT_TYPE] * 20
        assert records["marker"].tolist() == list(range(100, 120))
        assert set(records["rate"].tolist()) == {1} and set(records["tgid"].tolist()) == {os.getpid()}
        stats = KernelCounters.from_stats(program.kernel_stats())
        assert (stats.events, stats.sampled_out, stats.lost_reserve, stats.emitted) == (20, 0, 0, 20)
        assert program.kernel_stats()["processed"] == 0  # not the program's own work
