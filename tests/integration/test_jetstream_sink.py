"""The JetStream sink against a real ``nats-server`` on loopback (started and stopped here):
acknowledged writes, the stream dropping a replay's duplicates by id, both payload formats,
a one-message window, and errors (not hangs) while the server is down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
from _nats import nats_cluster

from pipeline import InflightBudget, Ledger, StageContext
from pipeline.testing import make_batch
from stages.jetstream_sink import JetStreamConfig, JetStreamSink
from stages.jsonl_sink import JsonLinesEncoder
from stages.spool_replay import SpooledBatch, run_id

pytestmark = pytest.mark.nats


def sink(urls: list[str], **config: Any) -> JetStreamSink:
    ctx = StageContext("js", "sink", Ledger(), InflightBudget())
    raw = {"servers": urls, "stream": "T", "node": "node-a", **config}
    return JetStreamSink(msgspec.convert(raw, JetStreamConfig), ctx)


async def stream_messages(urls: list[str]) -> list[Any]:
    async def read() -> list[Any]:
        import nats

        nc = await nats.connect(servers=urls)
        try:
            js = nc.jetstream()
            info = await js.stream_info("T")
            return [
                await js.get_msg("T", seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)
            ]
        finally:
            await nc.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(read()))


def batch(seq: int, n: int) -> Any:
    return make_batch(source="synthetic", seq=seq, ts_ns=np.arange(n) + 10**9, value=np.arange(n) + seq * n)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_writes_are_stored_once_and_a_replay_is_deduplicated(tmp_path: Path, fmt: str) -> None:
    with nats_cluster(tmp_path) as cluster:
        s = sink(cluster.urls, format=fmt, max_events_per_message=100, max_unacked=1)
        try:
            for seq in range(3):
                await s.write(batch(seq, 250))
            # The same batch, spooled and replayed: same ids, so the stream keeps one copy.
            b1 = batch(1, 250)
            lines = JsonLinesEncoder().encode(b1.events, b1.weights, b1.event_name)
            await s.write_spooled([SpooledBatch(run_id(), "synthetic", 1, b1.event_name, 250, lines)])
        finally:
            await s.aclose()
        stats = s.statistics()
        assert (stats.acked_events, stats.duplicate_messages, stats.replayed_events) == (1000, 3, 250)
        messages = await stream_messages(cluster.urls)
    assert len(messages) == 9
    assert {m.subject for m in messages} == {"bpfpipe.node-a.synthetic._"}
    if fmt == "json":
        values = [msgspec.json.decode(line)["value"] for m in messages for line in m.data.splitlines()]
    else:
        values = [row["value"] for m in messages for row in msgspec.msgpack.decode(m.data)]
    assert values == list(range(750))


async def test_writes_fail_while_the_server_is_down_and_resume_after(tmp_path: Path) -> None:
    with nats_cluster(tmp_path) as cluster:
        server = cluster.servers[0]
        server.stop()
        s = sink(cluster.urls, connect_timeout_s=0.5, ack_timeout_s=0.3, retry_for_s=0.3)
        try:
            start = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017  # whichever nats-py raises: no servers
                await s.write(batch(0, 10))
            assert time.monotonic() - start < 5
            server.start()
            await s.write(batch(1, 10))  # connects now
            server.stop()
            with pytest.raises(Exception):  # noqa: B017  # connected once, now reconnecting: ack timeout
                await s.write(batch(2, 10))
            server.start()
            with trio.fail_after(15):
                while True:
                    try:
                        await s.write(batch(2, 10))
                        break
                    except Exception:
                        await trio.sleep(0.2)
        finally:
            await s.aclose()
        values = [
            msgspec.json.decode(line)["value"]
            for m in await stream_messages(cluster.urls)
            for line in m.data.splitlines()
        ]
    # Batch 2's failed try may have reached the stream when the server came back: same ids, one copy.
    assert values == list(range(10, 30))


async def test_a_cancelled_write_returns_at_once_and_the_sink_recovers(tmp_path: Path) -> None:
    """The breaker cancels a write at ``stage_timeout_s``: the write returns at once, and once
    the server is back a write with a two-message window goes through (the cancelled writes'
    messages do not hold the window)."""
    with nats_cluster(tmp_path) as cluster:
        server = cluster.servers[0]
        s = sink(cluster.urls, max_unacked=2, max_events_per_message=1, ack_timeout_s=5, retry_for_s=5)
        try:
            await s.write(batch(0, 2))
            server.stop()
            for seq in (1, 2, 3):
                with trio.move_on_after(0.3) as scope:
                    await s.write(batch(seq, 10))
                assert scope.cancelled_caught
            server.start()
            with trio.fail_after(15):
                await s.write(batch(4, 10))
        finally:
            await s.aclose()
