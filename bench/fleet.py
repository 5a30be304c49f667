"""Fleet policy: time from a policy stored in the bucket to every agent's acknowledgement.

One ``nats-server`` on loopback and ``--agents`` ``bpfpipe run`` agents (synthetic source,
a sampler, null sink, distinct ``fleet.node``), all started and stopped here. Each round
stores a new global policy (``sampler.max_sample_rate`` alternating) and waits, watching
``status.>``, until every agent's status carries that revision with ``ok``:

* **ack**: from the put (its call) to the last agent's status seen here — the put's round
  trip, the agents' watch, the merge and validation, the reload (a sampler reconfigured in
  place), the status write and its delivery to this watcher;
* **bare watch** (the baseline, in the same run): from a put (its call) to a plain nats-py
  watcher in this process seeing it — the transport's own floor for one hop;
* **cli**: one ``bpfpipe policy set`` process, start to every agent acknowledged (Python's
  start and imports included), for the operator's view.

    .venv/bin/python bench/fleet.py              # 3 agents, 30 rounds, ~20 s
    .venv/bin/python bench/fleet.py --agents 10 --rounds 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _machine import machine  # noqa: E402
from _nats import nats_cluster  # noqa: E402

from pipeline._fleet_client import KvClient  # noqa: E402
from pipeline.fleet import ControlPlaneUnreachable  # noqa: E402

BUCKET = "bpfpipe-policy"
AGENT_ENV = {"METRICS_PORT": "0", "HEALTH_CHECK_PORT": "0", "ADMIN_PORT": "0"}


def agent_config(url: str, node: str) -> str:
    return (
        "watch_config = false\n"
        '[source]\nuse = "synthetic"\nconfig = { rate_per_s = 2000, batch_size = 100 }\n'
        '[[stages]]\nuse = "sampler"\n[sink]\nuse = "null"\n'
        f'[fleet]\nservers = ["{url}"]\nnode = "{node}"\n'
    )


async def _acknowledged(updates: asyncio.Queue[Any], nodes: set[str], revision: int) -> float:
    """When (monotonic) every node's status says ``revision`` applied."""
    pending = set(nodes)
    while pending:
        entry = await asyncio.wait_for(updates.get(), 30)
        doc = json.loads(entry.value)
        if doc["ok"] and doc["revisions"].get("global") == revision:
            pending.discard(doc["node"])
    return time.monotonic()


async def measure(url: str, nodes: set[str], rounds: int, workdir: Path) -> dict[str, Any]:
    nc = await nats.connect([url])
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        statuses: asyncio.Queue[Any] = asyncio.Queue()
        watcher = await kv.watch("status.>")

        async def pump() -> None:
            async for entry in watcher:
                if entry is not None and entry.value:
                    await statuses.put(entry)

        pumping = asyncio.create_task(pump())
        bare_watch = await kv.watch("bench.>")
        first = await bare_watch.updates(5)  # the initial "nothing yet" marker
        assert first is None
        ack_ms, bare_ms = [], []
        for i in range(rounds):
            policy = json.dumps({"sampler": {"max_sample_rate": 100 + i % 2}}).encode()
            while not statuses.empty():
                statuses.get_nowait()
            putting = time.monotonic()
            revision = await kv.put("global", policy)
            ack_ms.append((await _acknowledged(statuses, nodes, revision) - putting) * 1000)
            putting = time.monotonic()
            await kv.put("bench.probe", policy)
            await bare_watch.updates(5)
            bare_ms.append((time.monotonic() - putting) * 1000)
        # The operator's view: one `bpfpipe policy set` process.
        path = workdir / "policy.json"
        path.write_text(json.dumps({"sampler": {"max_sample_rate": 250}}))
        while not statuses.empty():
            statuses.get_nowait()
        started = time.monotonic()
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline.cli", "policy", "set", str(path), "--servers", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await done.communicate()
        assert done.returncode == 0, err.decode()
        revision = int(out.decode().split("revision")[1])
        cli_ms = (await _acknowledged(statuses, nodes, revision) - started) * 1000
        pumping.cancel()
        return {"ack_ms": ack_ms, "bare_ms": bare_ms, "cli_ms": cli_ms}
    finally:
        await nc.close()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, nats_cluster(Path(tmp), n=1) as cluster:
        url = cluster.urls[0]
        nodes = {f"bench{i}" for i in range(args.agents)}
        agents: list[subprocess.Popen[bytes]] = []
        try:
            for node in sorted(nodes):
                config = Path(tmp) / f"{node}.toml"
                config.write_text(agent_config(url, node))
                log = (Path(tmp) / f"{node}.log").open("wb")
                agents.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)],
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        env={**os.environ, **AGENT_ENV},
                    )
                )
            asyncio.run(_wait_reported(url, nodes))
            result = asyncio.run(measure(url, nodes, args.rounds, Path(tmp)))
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
    ack, bare = summary(result["ack_ms"]), summary(result["bare_ms"])
    print(
        json.dumps(
            {
                "bench": "fleet policy: set -> all agents acknowledged",
                "agents": args.agents,
                "rounds": args.rounds,
                "ack_ms": ack,
                "bare_watch_ms": bare,
                "ack_over_bare_median": round(ack["median"] / bare["median"], 1) if bare["median"] else None,
                "cli_set_to_all_acknowledged_ms": round(result["cli_ms"], 1),
                "requirement_ms": 2000,
                "machine": machine(),
            },
            indent=2,
        )
    )


async def _wait_reported(url: str, nodes: set[str], timeout_s: float = 120) -> None:
    """Until every agent has written its first status (the bucket exists by then)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client = await KvClient.open([url], BUCKET, 2.0, create=False)
            try:
                keys = set(await client.keys())  # not nats-py's keys(): see KvClient.keys
            finally:
                await client.close()
            if {f"status.{n}" for n in nodes} <= keys:
                return
        except ControlPlaneUnreachable:  # no bucket yet (BucketMissing is one)
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"agents did not report within {timeout_s} s")


if __name__ == "__main__":
    main()
