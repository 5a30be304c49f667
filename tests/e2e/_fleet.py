"""Fleet policy tests' helpers: agent configs with ``[fleet]``, the bucket read and written
directly (as another control plane, or a buggy one, would), waiting on statuses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import nats

from pipeline._fleet_client import BucketMissing, KvClient
from pipeline.fleet import ControlPlaneUnreachable

BUCKET = "bpfpipe-policy"


def fleet_toml(servers: list[str], node: str) -> str:
    return f"[fleet]\nservers = {json.dumps(servers)}\nnode = {json.dumps(node)}\nconnect_timeout_s = 1.0\n"


def synthetic_config(servers: list[str], node: str) -> str:
    return (
        "watch_config = false\n"
        '[source]\nuse = "synthetic"\nconfig = { rate_per_s = 2000, batch_size = 100 }\n'
        '[[stages]]\nuse = "sampler"\nconfig = { max_sample_rate = 1000 }\n'
        '[sink]\nuse = "null"\n' + fleet_toml(servers, node)
    )


async def _with_kv(url: str, action: Callable[[Any], Any]) -> Any:
    nc = await nats.connect([url], connect_timeout=2, allow_reconnect=False)
    try:
        kv = await nc.jetstream(timeout=2).key_value(BUCKET)
        return await action(kv)
    finally:
        await nc.close()


def raw_put(url: str, key: str, data: bytes) -> int:
    """Write ``data`` at ``key`` without ``bpfpipe policy``'s checks; its revision."""
    return int(asyncio.run(_with_kv(url, lambda kv: kv.put(key, data))))


def statuses(url: str) -> dict[str, dict[str, Any]]:
    """Every ``status.<node>`` document, by node ({} before the bucket exists).

    Keys are listed by the product's client (the stream's subject index), not by nats-py's
    ``KeyValue.keys()``, which leaves keys out while the agents write (see ``KvClient.keys``).
    """

    async def read() -> dict[str, dict[str, Any]]:
        try:
            client = await KvClient.open([url], BUCKET, 2.0, create=False)
        except BucketMissing:
            return {}
        try:
            out = {}
            for key in await client.keys():
                if key.startswith("status."):
                    _, value = await client.get(key)
                    if value is not None:
                        doc = json.loads(value)
                        out[doc["node"]] = doc
            return out
        finally:
            await client.close()

    return asyncio.run(read())


def wait_statuses(
    url: str, accept: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 30, interval: float = 0.02
) -> tuple[dict[str, dict[str, Any]], float]:
    """The first statuses ``accept`` takes, and when (``time.monotonic()``) they were read."""
    deadline = time.monotonic() + timeout
    last: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        try:
            last = statuses(url)
        except ControlPlaneUnreachable:  # a server restarting under the test: ask again
            time.sleep(interval)
            continue
        if accept(last):
            return last, time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"statuses never settled in {timeout} s: {json.dumps(last, indent=1)}")
