"""Ring-buffer read + decode throughput: bcc's callback path vs bpfpipe's mmap path.

One BPF program (``loadgen``: K events per getppid() call of one process) and
one producer process calling getppid() in a tight loop, pinned to another CPU
than the consumer, so kernel production and user-space consumption run in
parallel. Each path consumes the same number of events from the same ring:

* ``bcc``: ``b["events"].open_ring_buffer(cb)`` + ``b.ring_buffer_poll()``; the
  callback calls ``b["events"].event(data)`` (a ctypes view of clang's struct)
  and reads one field — the per-event Python path bcc tools use.
* ``bpfpipe``: :class:`bpf.ringbuf.RingBuffer` + :func:`stages.raw_records.raw_batch`
  + :func:`stages.decoder.decode_records` per wake-up: one copy and one
  vectorised decode for every record committed since the last wake-up.
* ``bpfpipe_pipeline``: the same through trio stages —
  RingBufferReader → Decoder → NullSink — with exact accounting.

A path's rate is events consumed / wall time from enabling the producer to the
last event. ``lost_reserve`` is what the kernel dropped because the consumer
fell behind (ring full); ``producer_events_per_s`` is what the kernel produced
meanwhile: when it is close to the consumer's rate with nothing lost, the
producer, not the consumer, was the limit.

Usage (root)::

    .venv/bin/python bench/ringbuf.py            # 3 interleaved rounds, about 10-20 s
    .venv/bin/python bench/ringbuf.py --quick    # smoke run, a few seconds
    .venv/bin/python bench/ringbuf.py --events 5000000 --repeat 5 --ring-bytes 4194304

Each path reports the median over the rounds and every run; ``ratio_per_repeat``
pairs the two paths measured a few seconds apart (this matters on shared hosts,
where the CPU's speed can change several-fold from one minute to the next).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from bpf.loader import LoadedProgram, LoadgenProgram, load_program
from bpf.ringbuf import RingBuffer
from pipeline import NodeSpec, Outcome, Pipeline
from stages.decoder import Decoder, decode_records
from stages.null_sink import NullSink
from stages.raw_records import EventSchema, raw_batch
from stages.reader import RingBufferReader, RingBufferReaderConfig

PRODUCER = "import os\ngetppid = os.getppid\nwhile True:\n    getppid()\n"
TIMEOUT_S = 60.0


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import bcc

        bcc_version = getattr(bcc, "__version__", "unknown")
    except ImportError:
        bcc_version = "unavailable"
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "bcc": bcc_version,
    }


class Producer:
    """A process calling getppid() forever; events flow only while loadgen targets it."""

    def __init__(self, cpu: int | None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PRODUCER])
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def drain(program: LoadedProgram) -> None:
    with RingBuffer(program.ring_map_fd, program.ring_size_bytes) as ring:
        while ring.skip().size_bytes:
            pass


def measure(
    program: LoadgenProgram, producer: Producer, per_call: int, consume: Callable[[], int]
) -> dict[str, Any]:
    """Enable the producer, run ``consume`` (returns events consumed), disable, drain."""
    drain(program)
    before = program.kernel_stats()
    start = time.perf_counter()
    program.configure_loadgen(producer.pid, per_call)
    consumed = consume()
    elapsed = time.perf_counter() - start
    program.configure_loadgen(0, per_call)
    time.sleep(0.01)
    during = program.kernel_stats()
    drain(program)
    delta = {k: during[k] - before[k] for k in during}
    return {
        "events": consumed,
        "seconds": round(elapsed, 4),
        "events_per_s": round(consumed / elapsed),
        "producer_events_per_s": round(delta["events"] / elapsed),
        "lost_reserve": delta["lost_reserve"],
        "sampled_out": delta["sampled_out"],
        # Nothing lost: the consumer kept up, so the producer set the pace.
        "limited_by": "consumer" if delta["lost_reserve"] else "producer",
    }


class BccConsumer:
    """bcc's own path. The ring buffer is opened once (bcc cannot close it again)."""

    def __init__(self, program: LoadgenProgram) -> None:
        bpf = program.bpf
        table = bpf[b"events"]
        # What bcc would infer from a BPF_PERF_OUTPUT struct; for a ring buffer fed by
        # bpf_ringbuf_reserve() we hand it clang's struct (the loader's layout probe).
        table._event_class = bpf[b"__schema_loadgen"].Leaf
        self.bpf = bpf
        self.count = 0
        self.target = 0

        def callback(ctx: Any, data: Any, size: int) -> int:
            event = table.event(data)
            _ = event.seq
            self.count += 1
            return -1 if self.count >= self.target else 0  # negative: stop polling (libbpf)

        table.open_ring_buffer(callback)

    def consumer(self, target: int) -> Callable[[], int]:
        def consume() -> int:
            self.count, self.target = 0, target
            deadline = time.monotonic() + TIMEOUT_S
            while self.count < target and time.monotonic() < deadline:
                self.bpf.ring_buffer_poll(100)
            return self.count

        return consume


def bpfpipe_path(program: LoadgenProgram, target: int) -> Callable[[], int]:
    schema = EventSchema.from_program(program)

    def consume() -> int:
        count = 0
        deadline = time.monotonic() + TIMEOUT_S
        with RingBuffer(program.ring_map_fd, program.ring_size_bytes) as ring:
            poller = select.epoll()
            poller.register(ring.fileno(), select.EPOLLIN)
            try:
                while count < target and time.monotonic() < deadline:
                    read = ring.read_batch()
                    if read.records:
                        for batch in decode_records(raw_batch(read, schema)).batches:
                            count += len(batch.events)
                    else:
                        poller.poll(0.1)
            finally:
                poller.close()
        return count

    return consume


def pipeline_path(per_call: int, ring_bytes: int, target: int, producer: Producer) -> dict[str, Any]:
    """The trio stages, loading their own copy of the program through the loader."""
    config = RingBufferReaderConfig(program="loadgen", ring_buffer_size=ring_bytes)
    pipe = Pipeline(
        [
            NodeSpec("reader", RingBufferReader, config),
            NodeSpec("decoder", Decoder),
            NodeSpec("sink", NullSink),
        ],
        [16, 16],
    )
    result: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(pipe.run)
            reader = pipe.nodes[0]
            assert isinstance(reader, RingBufferReader) and isinstance(reader.program, LoadgenProgram)
            program = reader.program
            start = time.perf_counter()
            program.configure_loadgen(producer.pid, per_call)
            with trio.move_on_after(TIMEOUT_S):
                while pipe.ledger.snapshot().total(Outcome.DELIVERED) < target:
                    await trio.sleep(0.001)
            elapsed = time.perf_counter() - start
            delivered = pipe.ledger.snapshot().total(Outcome.DELIVERED)
            program.configure_loadgen(0, per_call)
            pipe.stop()
        snap = pipe.ledger.snapshot()
        lost = snap.total(Outcome.LOST_ON_RESERVE)
        result.update(
            events=delivered,
            seconds=round(elapsed, 4),
            events_per_s=round(delivered / elapsed),
            lost_reserve=lost,
            limited_by="consumer" if lost else "producer",
            # After stop(): everything produced, up to the last event drained at shutdown.
            ledger_balanced=snap.pending == 0,
            produced_total=snap.produced,
            delivered_total=snap.total(Outcome.DELIVERED),
        )

    trio.run(main)
    return result


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [run["events_per_s"] for run in runs]
    return {"events_per_s_median": int(statistics.median(rates)), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 100k events per path, one repeat")
    parser.add_argument("--events", type=int, default=1_500_000, help="events each path consumes per repeat")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all three paths, interleaved")
    parser.add_argument("--per-call", type=int, default=64, help="events per getppid() call (max 64)")
    parser.add_argument("--ring-bytes", type=int, default=4 << 20, help="ring buffer size")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/ringbuf.py: needs root to load BPF programs; run it with sudo", file=sys.stderr)
        return 2
    events, repeat = (100_000, 1) if args.quick else (args.events, args.repeat)

    cpus = sorted(os.sched_getaffinity(0))
    consumer_cpu, producer_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    if consumer_cpu is not None:
        os.sched_setaffinity(0, {consumer_cpu})

    program = load_program("loadgen", ring_buffer_size=args.ring_bytes, map_size=None)
    assert isinstance(program, LoadgenProgram)
    producer = Producer(producer_cpu)
    runs: dict[str, list[dict[str, Any]]] = {"bcc": [], "bpfpipe": [], "bpfpipe_pipeline": []}
    try:
        bcc = BccConsumer(program)
        for _ in range(repeat):  # interleaved, so a slower minute of a shared host hits all paths
            runs["bcc"].append(measure(program, producer, args.per_call, bcc.consumer(events)))
            runs["bpfpipe"].append(measure(program, producer, args.per_call, bpfpipe_path(program, events)))
            runs["bpfpipe_pipeline"].append(pipeline_path(args.per_call, args.ring_bytes, events, producer))
    finally:
        program.close()
        producer.stop()

    result: dict[str, Any] = {
        "benchmark": "ringbuf read+decode",
        "machine": machine(),
        "program": "loadgen",
        "event_bytes": int(next(iter(program.event_types.values())).itemsize),
        "ring_bytes": program.ring_size_bytes,
        "events_per_call": args.per_call,
        "events_per_run": events,
        "repeat": repeat,
        "consumer_cpu": consumer_cpu,
        "producer_cpu": producer_cpu,
    }
    result.update({path: summary(path_runs) for path, path_runs in runs.items()})
    result["ratio_bpfpipe_over_bcc"] = round(
        result["bpfpipe"]["events_per_s_median"] / result["bcc"]["events_per_s_median"], 1
    )
    result["ratio_per_repeat"] = [
        round(b["events_per_s"] / a["events_per_s"], 1)
        for a, b in zip(runs["bcc"], runs["bpfpipe"], strict=True)
    ]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
