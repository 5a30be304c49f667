"""The fleet bucket over nats-py (asyncio): connect, watch keys, get, put, list.

Runs on an asyncio loop: the agent's loop thread (``pipeline.asyncio_bridge``) or the
``bpfpipe policy`` command's ``asyncio.run``. Every failure to reach or keep the servers is
one :class:`~pipeline.fleet.ControlPlaneUnreachable` with a one-line reason.

The connection does not reconnect by itself: a lost connection ends the session (the
watch sees it within one ``next_updates`` timeout), and the caller opens a new one — whose
watch starts from the latest value of each key, so nothing is missed that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from .fleet import ControlPlaneUnreachable

__all__ = ["BucketMissing", "KvClient"]

KV_HISTORY = 16
"""Revisions the bucket keeps per key (``policy get`` shows the latest)."""


class BucketMissing(ControlPlaneUnreachable):
    exit_code = 1


async def _quiet(*_: Any) -> None:
    """nats-py logs every failed attempt with a traceback by default: we say it once ourselves."""


_NATS_ERRORS = (OSError, asyncio.TimeoutError, nats.errors.Error)


class KvClient:
    def __init__(
        self, nc: Client, js: JetStreamContext, kv: KeyValue, bucket: str, servers: Sequence[str]
    ) -> None:
        self.nc = nc
        self.js = js
        self.kv = kv
        self.bucket = bucket
        self.servers = list(servers)
        self._queue: asyncio.Queue[tuple[str, int, bytes | None] | None] = asyncio.Queue()
        self._watchers: list[Any] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._unready = 0

    @classmethod
    async def open(cls, servers: Sequence[str], bucket: str, timeout_s: float, *, create: bool) -> KvClient:
        """Connected to one of ``servers``, with the bucket (made if missing and ``create``)."""
        where = ", ".join(servers)
        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    list(servers),
                    connect_timeout=max(1, round(timeout_s)),
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.05,
                    error_cb=_quiet,
                    disconnected_cb=_quiet,
                    closed_cb=_quiet,
                ),
                timeout_s * max(1, len(servers)) + 1,
            )
        except _NATS_ERRORS as exc:
            raise ControlPlaneUnreachable(f"no NATS server answered at {where}: {_why(exc)}") from None
        try:
            js = nc.jetstream(timeout=timeout_s)
            try:
                kv = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise BucketMissing(
                        f"no bucket {bucket!r} at {where}: no agent or 'bpfpipe policy set' has used it yet"
                    ) from None
                kv = await js.create_key_value(bucket=bucket, history=KV_HISTORY)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, _NATS_ERRORS):
                raise ControlPlaneUnreachable(f"JetStream at {where}: {_why(exc)}") from None
            raise
        return cls(nc, js, kv, bucket, servers)

    def _check(self) -> None:
        if not self.nc.is_connected:
            raise ControlPlaneUnreachable(f"lost the connection to {', '.join(self.servers)}")

    async def watch(self, keys: Sequence[str]) -> None:
        """Watch ``keys``: their current values first (then ``next_updates`` says ready), then changes."""
        try:
            for key in keys:
                watcher = await self.kv.watch(key)
                self._watchers.append(watcher)
                self._unready += 1
                self._pumps.append(asyncio.create_task(self._pump(watcher)))
        except _NATS_ERRORS as exc:
            raise ControlPlaneUnreachable(f"cannot watch the bucket: {_why(exc)}") from None

    async def _pump(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:  # the initial values are all delivered
                await self._queue.put(None)
                continue
            deleted = entry.operation in ("DEL", "PURGE")
            await self._queue.put(
                (entry.key, entry.revision or 0, None if deleted else bytes(entry.value or b""))
            )

    async def next_updates(self, timeout_s: float) -> tuple[list[tuple[str, int, bytes | None]], bool]:
        """The changes so far (waiting up to ``timeout_s`` for the first), and whether every
        watched key's initial value has arrived."""
        out: list[tuple[str, int, bytes | None]] = []
        with contextlib.suppress(asyncio.TimeoutError):
            item = await asyncio.wait_for(self._queue.get(), timeout_s)
            while True:
                if item is None:
                    self._unready -= 1
                else:
                    out.append(item)
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
        if not out:
            self._check()
        return out, self._unready <= 0

    async def get(self, key: str) -> tuple[int, bytes | None]:
        """(revision, value) of ``key``; (0, None) when it does not exist or was deleted."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is one
            return 0, None
        except _NATS_ERRORS as exc:
            raise ControlPlaneUnreachable(f"get {key}: {_why(exc)}") from None
        return entry.revision or 0, bytes(entry.value or b"")

    async def put(self, key: str, value: bytes) -> int:
        try:
            return int(await self.kv.put(key, value))
        except _NATS_ERRORS as exc:
            raise ControlPlaneUnreachable(f"put {key}: {_why(exc)}") from None

    async def keys(self) -> list[str]:
        """The bucket's keys, from the stream's subject index at one instant (a deleted key may
        be among them: its ``get`` says so).

        Not nats-py's ``KeyValue.keys()``: it reads a last-per-subject consumer until a message
        says nothing is pending, and while agents write their statuses that happens early or
        late — in a loop of 300 calls against three keys rewritten every millisecond it gave
        keys twice, left keys out, and once raised "no keys found". ``policy set`` checks the
        global policy against every node override it lists, so a missed key is a missed check.
        """
        prefix = f"$KV.{self.bucket}."
        try:
            info = await self.js.stream_info(f"KV_{self.bucket}", subjects_filter=f"{prefix}>")
        except _NATS_ERRORS as exc:
            raise ControlPlaneUnreachable(f"list keys: {_why(exc)}") from None
        return sorted(subject.removeprefix(prefix) for subject in info.state.subjects or {})

    async def close(self) -> None:
        for task in self._pumps:
            task.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watcher.stop(), 1)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 2)


def _why(exc: BaseException) -> str:
    text = str(exc).removeprefix("nats: ").strip()
    return text or type(exc).__name__
