"""Runtime throughput: synthetic source → 4 no-op per-batch stages → null sink.

Prints JSON: events/s for batch sizes 1, 64 and 1024 and each one's ratio to
batch size 1 (the baseline, measured in the same run). Pinned to one core.
Target: >= 5 M events/s through 4 stages at batch 1024.

    python bench/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import trio

from pipeline import NodeSpec, Pipeline
from pipeline.testing import settings
from stages.noop import NoopStage
from stages.null_sink import NullSink
from stages.synthetic import SyntheticConfig, SyntheticSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine

STAGES = 4


def run_once(batch_size: int, total: int, capacity: int) -> dict[str, float]:
    specs = [NodeSpec("src", SyntheticSource, SyntheticConfig(batch_size=batch_size, total_events=total))]
    specs += [NodeSpec(f"noop{i}", NoopStage) for i in range(STAGES)]
    specs.append(NodeSpec("sink", NullSink))
    unbounded = settings(limits={"max_inflight_events": 0, "max_inflight_bytes": 0})
    pipe = Pipeline(specs, [capacity] * (len(specs) - 1), settings=unbounded)
    start = time.perf_counter()
    trio.run(pipe.run)
    seconds = time.perf_counter() - start
    ledger = pipe.ledger.snapshot()
    assert ledger.pending == 0 and ledger.by_outcome()["delivered"] == total
    return {
        "batch_size": batch_size,
        "events": total,
        "seconds": round(seconds, 4),
        "events_per_s": total / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small runs (smoke test)")
    parser.add_argument("--capacity", type=int, default=16, help="channel capacity in batches")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    scale = 0.05 if args.quick else 1.0
    sizes = {1: 100_000, 64: 3_000_000, 1024: 30_000_000}
    results = []
    for batch_size, total in sizes.items():
        run_once(batch_size, max(batch_size, int(total * scale * 0.02)), args.capacity)  # warm-up
        results.append(run_once(batch_size, int(total * scale) // batch_size * batch_size, args.capacity))
    baseline = results[0]["events_per_s"]
    for r in results:
        r["events_per_s"] = round(r["events_per_s"])
        r["ratio_to_batch_1"] = round(r["events_per_s"] / baseline, 1)
    print(
        json.dumps(
            {
                "benchmark": "pipeline: synthetic -> 4 x noop -> null",
                "machine": machine(),
                "channel_capacity": args.capacity,
                "baseline": "batch_size 1 in this run",
                "results": results,
                "target": {
                    "batch_size": 1024,
                    "events_per_s": 5_000_000,
                    "met": results[-1]["events_per_s"] >= 5_000_000,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
