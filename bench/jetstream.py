"""What the JetStream sink delivers to one local ``nats-server``, against nats-py on its own.

One ``nats-server`` (Debian's, JetStream, file storage) on loopback, started and stopped here.
Synthetic events (the synthetic source's layout) in batches of ``--batch`` events:

* **sink**: ``JetStreamSink.write(batch)`` from trio — JSON-lines encoding of each batch,
  chunking into 100-event messages, ids, publishing through the asyncio bridge with the
  ``max_unacked`` window, waiting for every ack — events acknowledged per second;
* **bare loop** (the baseline): the same payloads (the sink's messages, encoded beforehand,
  so the loop does no encoding at all) published by a plain nats-py loop, ``await
  js.publish(...)`` one message after another, each with its ``Nats-Msg-Id``;
* **bare window** (for context): the same payloads through nats-py's ``publish_async`` with the
  same window as the sink, then all acks awaited — what nats-py can do when it pipelines.

Rounds are interleaved (sink, bare loop, bare window, …); the stream is purged between them.
Targets: sink ≥ 0.8 x the bare loop, and ≥ 500 k events/s. Prints JSON like the other benches::

    .venv/bin/python bench/jetstream.py            # about 30 s
    .venv/bin/python bench/jetstream.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import trio

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _machine import machine  # noqa: E402
from _nats import nats_cluster  # noqa: E402

from pipeline import Batch, InflightBudget, Ledger, StageContext  # noqa: E402
from stages.jetstream_sink import JetStreamConfig, JetStreamSink, Message  # noqa: E402
from stages.synthetic import EVENT_NAME, SYNTHETIC_DTYPE  # noqa: E402

STREAM = "BENCH"
RATIO_TARGET = 0.8
RATE_TARGET = 500_000
EVENTS_PER_MESSAGE = 100


def batches(n_batches: int, size: int) -> list[Batch]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_batches):
        events = np.zeros(size, dtype=SYNTHETIC_DTYPE)
        events["ts_ns"] = 10**12 + np.arange(i * size, (i + 1) * size) * 1000
        events["seq"] = np.arange(i * size, (i + 1) * size)
        events["pid"] = rng.integers(1, 1 << 22, size)
        events["value"] = rng.integers(0, 1 << 40, size)
        out.append(Batch(events, source="synthetic", seq=i, event_name=EVENT_NAME))
    return out


def make_sink(url: str, max_unacked: int) -> JetStreamSink:
    ctx = StageContext("jetstream", "sink", Ledger(), InflightBudget())
    config = msgspec.convert(
        {
            "servers": [url],
            "stream": STREAM,
            "node": "bench",
            "max_unacked": max_unacked,
            "max_events_per_message": EVENTS_PER_MESSAGE,
        },
        JetStreamConfig,
    )
    return JetStreamSink(config, ctx)


async def run_sink(url: str, work: list[Batch], max_unacked: int) -> float:
    sink = make_sink(url, max_unacked)
    try:
        await sink.write(work[0])  # connect outside the timing
        start = time.perf_counter()
        for batch in work[1:]:
            await sink.write(batch)
        took = time.perf_counter() - start
    finally:
        await sink.aclose()
    return sum(len(b) for b in work[1:]) / took


async def purge(url: str) -> None:
    import nats

    nc = await nats.connect(servers=[url])
    try:
        await nc.jetstream().purge_stream(STREAM)
    finally:
        await nc.close()


async def run_bare(url: str, messages: list[Message], window: int) -> float:
    """``window`` 0: ``await js.publish`` one by one; else ``publish_async`` with that window."""
    import nats

    nc = await nats.connect(servers=[url])
    try:
        js = nc.jetstream(timeout=5, publish_async_max_pending=max(window, 1))
        tag = f"{time.time_ns():x}"
        start = time.perf_counter()
        if window == 0:
            for i, m in enumerate(messages):
                await js.publish(m.subject, m.payload, headers={"Nats-Msg-Id": f"{tag}:{i}"})
        else:
            futures = [
                await js.publish_async(m.subject, m.payload, headers={"Nats-Msg-Id": f"{tag}:{i}"})
                for i, m in enumerate(messages)
            ]
            await asyncio.gather(*futures)
        took = time.perf_counter() - start
    finally:
        await nc.close()
    return sum(m.events for m in messages) / took


async def create_stream(url: str) -> None:
    import nats

    nc = await nats.connect(servers=[url])
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=["bpfpipe.>"], duplicate_window=120.0)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small runs (smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=8192, help="events per batch")
    parser.add_argument("--events", type=int, default=1_000_000, help="events per round")
    parser.add_argument("--max-unacked", type=int, default=256, help="the sink's window")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    n_batches = max(2, (100_000 if args.quick else args.events) // args.batch) + 1
    work = batches(n_batches, args.batch)
    with tempfile.TemporaryDirectory() as tmp, nats_cluster(Path(tmp), n=1) as cluster:
        url = cluster.urls[0]
        asyncio.run(create_stream(url))
        encoder_sink = make_sink(url, args.max_unacked)
        lines = [b"".join(trio.run(encoder_sink._encoder.encode_batch, b)) for b in work[1:]]
        messages = [
            m
            for b, blob in zip(work[1:], lines, strict=True)
            for m in encoder_sink.messages("bare", b.source, b.seq, b.event_name, blob, 1 << 20)
        ]
        rates: dict[str, list[float]] = {"sink": [], "bare_loop": [], "bare_window": []}
        for _ in range(repeat):
            rates["sink"].append(trio.run(run_sink, url, work, args.max_unacked))
            asyncio.run(purge(url))
            rates["bare_loop"].append(asyncio.run(run_bare(url, messages, 0)))
            asyncio.run(purge(url))
            rates["bare_window"].append(asyncio.run(run_bare(url, messages, args.max_unacked)))
            asyncio.run(purge(url))
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = median["sink"] / median["bare_loop"]
    print(
        json.dumps(
            {
                "benchmark": "jetstream sink: events acknowledged per second by one local nats-server",
                "machine": machine(),
                "baseline": "a bare nats-py loop (await js.publish per message) of the sink's own payloads,"
                " interleaved in this run",
                "batch_events": args.batch,
                "events_per_message": EVENTS_PER_MESSAGE,
                "max_unacked": args.max_unacked,
                "events_per_round": sum(len(b) for b in work[1:]),
                "rounds": repeat,
                "events_per_s": {name: round(value) for name, value in median.items()},
                "runs_events_per_s": {name: [round(v) for v in values] for name, values in rates.items()},
                "ratio_sink_to_bare_loop": round(ratio, 3),
                "ratio_sink_to_bare_window": round(median["sink"] / median["bare_window"], 3),
                "targets": {
                    "ratio_to_bare_loop": {
                        "target": RATIO_TARGET,
                        "value": round(ratio, 3),
                        "result": "PASS" if ratio >= RATIO_TARGET else "FAIL",
                    },
                    "events_per_s": {
                        "target": RATE_TARGET,
                        "value": round(median["sink"]),
                        "result": "PASS" if median["sink"] >= RATE_TARGET else "FAIL",
                    },
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
