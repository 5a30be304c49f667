"""tests/_nats.py itself: a 3-server cluster serves a replicated stream, a killed server comes
back with its ports and store, and nothing outlives the context."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from _nats import nats_cluster

pytestmark = pytest.mark.nats


async def _publish_and_count(urls: list[str], create: bool) -> int:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=10)
        if create:
            await js.add_stream(name="H", subjects=["h.>"], num_replicas=3)
        await js.publish("h.x", b"x")
        return int((await js.stream_info("H")).state.messages)
    finally:
        await nc.close()


def test_cluster_restart_and_cleanup(tmp_path: Path) -> None:
    with nats_cluster(tmp_path, n=3) as cluster:
        assert len(set(cluster.urls)) == 3
        assert asyncio.run(_publish_and_count(cluster.urls, create=True)) == 1
        leader = cluster.stream_leader("H")
        port = leader.port
        leader.kill()
        assert not leader.running
        leader.start()
        assert leader.running and leader.port == port
        assert asyncio.run(_publish_and_count([leader.url], create=False)) == 2
        procs = [server.proc for server in cluster.servers]
    for proc in procs:
        assert proc is not None and proc.poll() is not None
        assert not os.path.exists(f"/proc/{proc.pid}") or proc.returncode is not None
