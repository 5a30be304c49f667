"""Real kernel under overload: the load generator drives the ring buffer far past
what a deliberately slow sink accepts. After shutdown the kernel-side counters and
the user-space outcomes balance exactly, the sampler lowered the kernel's rate,
and what was drained or lost is reported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from pipeline import Batch, BatchSink, NodeSpec, Outcome, Pipeline
from pipeline.config import decode_config
from stages.decoder import Decoder
from stages.programs import LoadgenConfig, LoadgenSource
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig

SINK_EVENTS_PER_S = 20_000
PRODUCER = """\
import os, sys, time
sys.stdin.readline()
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(1000):
        os.getppid()
"""


class SlowSink(BatchSink):
    """Accepts at most SINK_EVENTS_PER_S events per second."""

    async def write(self, batch: Batch) -> None:
        await trio.sleep(len(batch) / SINK_EVENTS_PER_S)


def build(overflow: str) -> Pipeline:
    settings = decode_config({"limits": {"max_events_per_sec": 0, "max_memory_mb": 0}})
    specs = [
        NodeSpec(
            "loadgen",
            LoadgenSource,
            LoadgenConfig(ring_buffer_size=1 << 16, overflow=overflow, max_batch_records=2048),  # type: ignore[arg-type]
        ),
        NodeSpec("decoder", Decoder),
        NodeSpec(
            "sampler",
            AdaptiveSampler,
            AdaptiveSamplerConfig(adjust_period_s=0.2, max_sample_rate=256, seed=1),
        ),
        NodeSpec("sink", SlowSink),
    ]
    return Pipeline(specs, [4, 4, 4], settings=settings)


async def drive(pipe: Pipeline, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        (program,) = list(pipe.services.programs())
        producer = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(seconds)], stdin=subprocess.PIPE, text=True
        )
        try:
            program.configure_loadgen(producer.pid, 64)
            assert producer.stdin is not None
            producer.stdin.write("go\n")
            producer.stdin.flush()
            await trio.to_thread.run_sync(producer.wait)
        finally:
            producer.kill()
            producer.wait()
            if producer.stdin is not None:
                producer.stdin.close()
        pipe.stop()


@pytest.mark.bpf
@pytest.mark.parametrize("overflow", ["drain_oldest", "block"])
def test_overload_balances_exactly_against_the_kernel(overflow: str) -> None:
    pipe = build(overflow)
    trio.run(drive, pipe, 4.0)

    reader = pipe.nodes[0]
    sampler = pipe.nodes[2]
    assert isinstance(reader, LoadgenSource) and isinstance(sampler, AdaptiveSampler)
    kernel = reader.statistics().kernel  # final counters, read after the program stopped
    ledger = pipe.ledger.snapshot()

    # Far past the sink: the kernel produced many times what the sink could take.
    assert kernel.events > 10 * SINK_EVENTS_PER_S * 4
    # Exact: every kernel event has exactly one outcome, and kernel and user space agree.
    assert kernel.in_flight == 0
    assert ledger.produced == kernel.events
    assert ledger.pending == 0
    assert ledger.total(Outcome.KERNEL_SAMPLED_OUT) == kernel.sampled_out
    assert ledger.total(Outcome.LOST_ON_RESERVE) == kernel.lost_reserve
    read_or_drained = ledger.produced - kernel.sampled_out - kernel.lost_reserve
    assert read_or_drained == kernel.emitted
    # The sampler lowered the kernel's rate: the gate sampled events out in the kernel.
    assert sampler.statistics().rate_changes > 0
    assert kernel.sampled_out > 0
    assert sampler.statistics().gate_attached
    # Loss is reported, by kind: draining (oldest first) or failed reservations.
    drained = ledger.total(Outcome.DRAINED)
    lost = ledger.total(Outcome.LOST_ON_RESERVE)
    assert drained + lost > 0
    if overflow == "block":
        assert drained == 0 or all(
            k.reason.startswith("shutdown") for k in ledger.outcomes if k.outcome is Outcome.DRAINED
        )
    delivered = ledger.total(Outcome.DELIVERED)
    assert 0 < delivered < kernel.events
