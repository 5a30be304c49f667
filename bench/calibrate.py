"""Calibration for ``bpfpipe capacity``: CPU per event, CPU per batch, baseline memory.

* ``per_event_us`` / ``per_batch_us``: the default chain's classes (a feed doing the
  reader's per-read work -> ``Decoder`` -> ``AdaptiveSampler`` -> ``NullSink``) in a
  :class:`pipeline.Pipeline`, no kernel, process CPU time per batch at two batch
  sizes, 1 and ``--large`` events: ``cpu(n) = per_batch + n * per_event`` solved from
  the two (best of ``--repeat`` runs each).
* ``base_rss_mb``: resident memory of ``bpfpipe run --source exec --sink null`` one
  second after it started (the interpreter, numpy, bcc and LLVM after the compile);
  with no BPF here, the synthetic source's, and the file says so.

Writes ``bench/results/calibration.json`` and, with ``--install``, the package's
default ``pipeline/calibration.json`` (what ``bpfpipe capacity`` uses unless given
``--calibration``). Prints the same JSON. About 20 s::

    .venv/bin/python bench/calibrate.py --install
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import trio

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

from _machine import machine  # noqa: E402
from batch_cost import EVENT, SCHEMA  # noqa: E402

from bpf.ringbuf import RingRead  # noqa: E402
from pipeline import BatchSender, NodeSpec, Pipeline, Source  # noqa: E402
from stages.decoder import Decoder  # noqa: E402
from stages.null_sink import NullSink  # noqa: E402
from stages.raw_records import raw_batch  # noqa: E402
from stages.sampler import AdaptiveSampler  # noqa: E402


def ring_read(n: int) -> RingRead:
    events = np.zeros(n, dtype=EVENT)
    events["type"], events["rate"], events["ts_ns"] = 4, 1, time.monotonic_ns()
    raw = np.frombuffer(events.tobytes(), dtype=np.uint8).copy()
    offsets = np.arange(n, dtype=np.int64) * EVENT.itemsize
    return RingRead(raw, offsets, np.full(n, EVENT.itemsize, dtype=np.uint32), 0)


class Feed(Source):
    events_per_batch = 1
    batches = 1000

    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        read = ring_read(self.events_per_batch)
        task_status.started()
        for seq in range(self.batches):
            batch = raw_batch(read, SCHEMA, source=self.ctx.name, seq=seq)
            self.ctx.produced(len(batch))
            await tx.send(batch)


def cpu_us_per_batch(events_per_batch: int, batches: int) -> float:
    Feed.events_per_batch, Feed.batches = events_per_batch, batches
    specs = [
        NodeSpec("reader", Feed),
        NodeSpec("decoder", Decoder),
        NodeSpec("sampler", AdaptiveSampler, AdaptiveSampler.Config(seed=1, max_sample_rate=1)),
        NodeSpec("sink", NullSink),
    ]
    pipe = Pipeline(specs, [16, 16, 16])
    start = time.process_time()
    trio.run(pipe.run)
    used = time.process_time() - start
    pipe.ledger.check_conserved()
    return used / batches * 1e6


def base_rss_mb() -> tuple[float, str]:
    source = "exec"
    env = {**os.environ, "METRICS_PORT": "0", "HEALTH_CHECK_PORT": "0", "ADMIN_PORT": "0"}
    for source in ("exec", "synthetic"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--source", source, "--sink", "null"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert proc.stderr is not None
        started = False
        for line in proc.stderr:
            if 'msg="pipeline started"' in line:
                started = True
                break
        if started:
            time.sleep(1.0)
            with open(f"/proc/{proc.pid}/status") as f:
                rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            return rss_kb / 1024, source
        proc.kill()
        proc.wait()
    raise SystemExit("calibrate: no agent started (neither exec nor synthetic)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large", type=int, default=256, help="events per batch for the marginal cost")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--install", action="store_true", help="also write pipeline/calibration.json")
    args = parser.parse_args()

    small = min(cpu_us_per_batch(1, 4000) for _ in range(args.repeat))
    large = min(cpu_us_per_batch(args.large, 400) for _ in range(args.repeat))
    per_event = (large - small) / (args.large - 1)
    per_batch = small - per_event
    rss, rss_source = base_rss_mb()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine()['cpu']}, {machine()['cores']} cores, kernel {machine()['kernel']}",
        "chain": "feed -> decoder -> sampler -> null (no kernel)",
        "per_event_us": round(per_event, 3),
        "per_batch_us": round(per_batch, 2),
        "cpu_us_per_batch": {"1": round(small, 2), str(args.large): round(large, 2)},
        "base_rss_mb": round(rss, 1),
        "base_rss_source": rss_source,
    }
    text = json.dumps(result, indent=2) + "\n"
    out = BENCH_DIR / "results" / "calibration.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    if args.install:
        (ROOT / "pipeline" / "calibration.json").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
