"""Per-batch fixed cost: reader -> decoder -> sampler -> breaker -> sink with one-event batches.

A trickle of events, read every ``max_batch_delay_ms``, makes batches of one or a few
events, so what a stage costs *per batch* (a channel hop, a task switch, accounting,
numpy calls on tiny arrays, allocations) is what the agent costs. Two views, both with
one-event batches and no kernel:

* ``chain``: the stages' public classes in a :class:`pipeline.Pipeline`, built up one
  stage at a time — a feed source doing the reader's per-read work (``raw_batch`` of a
  one-record ring read, ``ctx.produced``, ``send``) -> ``Decoder`` -> ``AdaptiveSampler``
  -> ``CircuitBreakerSink`` around ``NullSink`` (else ``NullSink``). A stage's cost is
  the difference in µs per batch between the chain with it and without it (its task,
  its channel hop, its work and accounting). The baseline, measured in the same run, is
  the shortest chain (feed -> null sink).
* ``calls``: the synchronous per-batch calls on their own (µs per call).

Usage::

    .venv/bin/python bench/batch_cost.py            # about 20 s
    .venv/bin/python bench/batch_cost.py --batches 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from _machine import machine  # noqa: E402

from bpf.ringbuf import RingRead  # noqa: E402
from pipeline import Batch, BatchReceiver, BatchSender, Ledger, NodeSpec, Pipeline, Source  # noqa: E402
from pipeline._channel import Edge, InflightBudget  # noqa: E402
from pipeline._stage import StageContext  # noqa: E402
from stages.breaker import CircuitBreakerConfig, CircuitBreakerSink  # noqa: E402
from stages.decoder import Decoder, decode_records  # noqa: E402
from stages.jsonl_sink import JsonLinesEncoder  # noqa: E402
from stages.null_sink import NullSink  # noqa: E402
from stages.raw_records import EventSchema, raw_batch  # noqa: E402
from stages.sampler import AdaptiveSampler  # noqa: E402

HEADER = np.dtype([("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")])
EVENT = np.dtype([*HEADER.descr, ("seq", "<u8"), ("payload", "<u8")])  # loadgen's layout
SCHEMA = EventSchema({4: EVENT}, {4: "loadgen"}, HEADER)


def one_record_read() -> RingRead:
    event = np.zeros(1, dtype=EVENT)
    event["type"], event["rate"], event["ts_ns"] = 4, 1, time.monotonic_ns()
    raw = np.frombuffer(event.tobytes(), dtype=np.uint8).copy()
    return RingRead(raw, np.array([0], dtype=np.int64), np.array([EVENT.itemsize], dtype=np.uint32), 0)


class FeedSource(Source):
    """The reader's per-read work, ``batches`` times, without a ring."""

    batches = 10_000

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        read = one_record_read()
        ctx = self.ctx
        task_status.started()
        for seq in range(self.batches):
            batch = raw_batch(read, SCHEMA, source=ctx.name, seq=seq)
            ctx.produced(1)
            await tx.send(batch)


def chain(stages: list[str], spool: Path) -> list[NodeSpec]:
    specs = [NodeSpec("reader", FeedSource)]
    if "decoder" in stages:
        specs.append(NodeSpec("decoder", Decoder))
    if "sampler" in stages:
        specs.append(NodeSpec("sampler", AdaptiveSampler, AdaptiveSampler.Config(seed=1)))
    if "breaker" in stages:
        config = CircuitBreakerConfig(primary="null", fallback_config={"path": str(spool)})
        specs.append(NodeSpec("breaker", CircuitBreakerSink, config))
    else:
        specs.append(NodeSpec("sink", NullSink))
    return specs


def run_chain(stages: list[str], batches: int, spool: Path) -> float:
    """µs per batch from start to the last batch delivered."""
    FeedSource.batches = batches
    specs = chain(stages, spool)
    pipe = Pipeline(specs, [16] * (len(specs) - 1))
    elapsed = [0.0]

    async def main() -> None:
        start = time.perf_counter()
        await pipe.run()
        elapsed[0] = time.perf_counter() - start

    trio.run(main)
    pipe.ledger.check_conserved()
    return elapsed[0] / batches * 1e6


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def calls(n: int) -> dict[str, float]:
    read = one_record_read()
    raw = raw_batch(read, SCHEMA)
    decoded = decode_records(raw).batches[0]
    encoder = JsonLinesEncoder()
    ctx = StageContext("s", "stage", Ledger(), InflightBudget())
    ctx.budget.admit_nowait(1 << 40, 0)
    edge = Edge("e", 1 << 30)
    tx = BatchSender(edge, ctx, admits=False)
    rx = BatchReceiver(edge, ctx)

    def send() -> None:
        tx.send_nowait(decoded)
        rx.receive_nowait()

    out = {
        "reader_raw_batch": per_call_us(lambda: raw_batch(read, SCHEMA), n),
        "decoder_decode_records": per_call_us(lambda: decode_records(raw), n),
        "batch_new": per_call_us(lambda: Batch(decoded.events, decoded.weights), n),
        "batch_nbytes": per_call_us(lambda: decoded.nbytes, n),
        "batch_weight_sum": per_call_us(lambda: decoded.weight_sum, n),
        "jsonl_encode": per_call_us(lambda: encoder.encode(decoded.events, decoded.weights, "loadgen"), n),
        "ctx_record_delivered": per_call_us(lambda: ctx.record(_DELIVERED, 1, decoded.weight_sum), n),
        "sender_send_nowait_and_receive": per_call_us(send, n),
    }
    return {k: round(v, 2) for k, v in out.items()}


_DELIVERED: Any = None


def main() -> int:
    global _DELIVERED
    from pipeline import Outcome

    _DELIVERED = Outcome.DELIVERED
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20_000, help="one-event batches per chain run")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    steps = [[], ["decoder"], ["decoder", "sampler"], ["decoder", "sampler", "breaker"]]
    names = ["reader+sink", "decoder", "sampler", "breaker"]
    totals: dict[int, list[float]] = {i: [] for i in range(len(steps))}
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool.jsonl"
        run_chain(steps[-1], 2000, spool)  # warm up imports and caches
        for _ in range(args.repeat):
            for i, step in enumerate(steps):
                totals[i].append(run_chain(step, args.batches, spool))
    medians = [statistics.median(totals[i]) for i in range(len(steps))]
    per_stage = {names[0]: round(medians[0], 2)}
    for i in range(1, len(steps)):
        per_stage[names[i]] = round(medians[i] - medians[i - 1], 2)
    result = {
        "benchmark": "per-batch fixed cost (one-event batches)",
        "machine": machine(),
        "batches_per_run": args.batches,
        "repeat": args.repeat,
        "baseline": "reader+sink: feed source (raw_batch + produced + send) -> NullSink, same run",
        "chain_us_per_batch": {
            "+".join(["reader", *s, "sink" if "breaker" not in s else ""]).rstrip("+"): round(m, 2)
            for s, m in zip(steps, medians, strict=True)
        },
        "stage_us_per_batch": per_stage,
        "ratio_full_chain_over_baseline": round(medians[-1] / medians[0], 2),
        "calls_us": calls(20_000),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
