"""JetStreamSink: batches to a NATS JetStream stream, acknowledged before they count.

``use = "jetstream"``. Each batch becomes a few messages on the subject
``<subject_prefix>.<node>.<source>.<event>`` (tokens made subject-safe), each holding up to
``max_events_per_message`` events and at most the server's ``max_payload`` bytes: JSON lines
exactly as the ``jsonl`` sink writes them (same encoder), or with ``format = "msgpack"`` a
msgpack array of the same objects (converted from those lines, so both formats chunk alike).

Delivery: ``write`` returns once the stream has acknowledged every message of the batch, so
an event counted as delivered is stored in the stream. Each message carries
``Nats-Msg-Id = <node>:<run>:<source>:<seq>:<event>:<chunk>`` (``run`` tells this process's
batch numbers from an earlier run's), so when a publish is retried — after an ack timeout, a
reconnect, a stream leader re-election, or a replay of the breaker's spool (see
:mod:`stages.spool_replay`) — the stream stores it once: at-least-once into the stream,
exactly-once in it within the stream's ``duplicate_window``.

Flow control: at most ``max_unacked`` messages are awaiting their acks (nats-py's
``publish_async`` window): a full window holds ``write``, which is back-pressure into the
pipeline. Messages that fail (no responders while a leader is elected, ack timeout,
disconnected) are retried with the same id for ``retry_for_s``; past that ``write``
raises, and the circuit breaker around the sink sends the batch to its spool. nats-py
reconnects across ``servers`` by itself; the connection is made at the first write (a sink
whose servers are down still starts: its writes fail until they are back).

The client is asyncio; it runs on its own loop in a thread (:mod:`pipeline.asyncio_bridge`
says why not trio-asyncio). One bridge call per batch carries all of that batch's messages.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import trio

from pipeline import Batch, BatchSink, ConfigError, StageContext
from pipeline import Config as Settings
from pipeline.asyncio_bridge import AsyncioThread

from .jsonl_sink import JsonLinesEncoder, line_ends
from .spool_replay import SpooledBatch, run_id

__all__ = [
    "JetStreamConfig",
    "JetStreamSink",
    "JetStreamStatistics",
    "Message",
    "chunk_ranges",
    "message_id",
    "subject_token",
]

log = logging.getLogger("bpfpipe.jetstream")

HEADER_ROOM_BYTES = 512
"""Left under ``max_payload`` for the headers (the id) and the subject."""


class JetStreamConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    """Server URLs; nats-py connects to one and reconnects across all (and those the cluster announces)."""
    stream: str = "BPFPIPE"
    """The stream the messages go to."""
    subject_prefix: str = "bpfpipe"
    """First subject token(s): subjects are ``<prefix>.<node>.<source>.<event>``."""
    node: str = ""
    """This agent's name in subjects and message ids; ``""``: the host name."""
    format: Literal["json", "msgpack"] = "json"
    create_stream: bool = True
    """Create the stream (subjects ``<prefix>.>``) at connect if it does not exist."""
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """Replicas of a stream this sink creates."""
    duplicate_window_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    """Dedup window of a stream this sink creates (retries within it are stored once)."""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    ack_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """How long one attempt waits for a message's ack."""
    retry_for_s: Annotated[float, msgspec.Meta(ge=0)] = 3.0
    """How long failed messages are retried (same ids) before ``write`` raises."""
    max_unacked: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Messages awaiting acks at most: the back-pressure window."""
    max_events_per_message: Annotated[int, msgspec.Meta(ge=1)] = 100


@dataclass(frozen=True, slots=True)
class JetStreamStatistics:
    connected: bool
    published_messages: int
    """Messages acknowledged by the stream (duplicates included)."""
    acked_events: int
    """Events in acknowledged messages."""
    duplicate_messages: int
    """Acks that said the stream already had the message (a retry or replay of a stored one)."""
    retried_messages: int
    replayed_events: int
    """Events of spooled batches this sink delivered on a replay."""


_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def subject_token(text: str) -> str:
    """``text`` as one subject token: anything but letters, digits, ``_`` and ``-`` becomes ``_``."""
    return _SUBJECT_UNSAFE.sub("_", text) or "_"


def message_id(node: str, run: str, source: str, seq: int, event: str, chunk: int) -> str:
    return f"{node}:{run}:{source}:{seq}:{event}:{chunk}"


def chunk_ranges(lines: bytes, max_events: int, max_bytes: int) -> list[tuple[int, int, int]]:
    """``(start, end, events)`` byte ranges of whole lines: greedy, at most ``max_events``
    lines and ``max_bytes`` bytes each (a single longer line goes alone; the server will
    refuse it). The same lines always give the same ranges, so a replay's chunks (and ids)
    are the first attempt's."""
    ends = line_ends(lines)
    out: list[tuple[int, int, int]] = []
    i, start, n = 0, 0, len(ends)
    while i < n:
        j = min(i + max_events, int(np.searchsorted(ends, start + max_bytes, side="right")))
        j = max(j, i + 1)
        end = int(ends[j - 1])
        out.append((start, end, j - i))
        start, i = end, j
    return out


@dataclass(frozen=True, slots=True)
class Message:
    subject: str
    payload: bytes
    msg_id: str
    events: int


@dataclass(slots=True)
class _Sent:
    duplicates: int = 0
    retried: int = 0


def _raise_if_cancelled() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Client:
    """The asyncio side: connection, stream, and publishing a batch's messages. Runs only on
    the bridge's loop."""

    def __init__(self, config: JetStreamConfig) -> None:
        self.config = config
        self.nc: Any = None
        self.js: Any = None
        self.closing = False
        self.healthy = False
        """The last publish call succeeded whole (see :meth:`publish` on order)."""

    @property
    def connected(self) -> bool:
        return self.nc is not None and bool(self.nc.is_connected)

    async def connect(self) -> int:
        """Connect (once; nats-py reconnects from then on) and return the server's max_payload."""
        import nats
        import nats.js.errors

        config = self.config
        if self.nc is None:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=config.servers,
                    connect_timeout=config.connect_timeout_s,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    name="bpfpipe",
                ),
                timeout=config.connect_timeout_s * (len(config.servers) + 1),
            )
            js = nc.jetstream(timeout=config.ack_timeout_s, publish_async_max_pending=config.max_unacked)
            if config.create_stream:
                try:
                    await js.add_stream(
                        name=config.stream,
                        subjects=[f"{config.subject_prefix}.>"],
                        num_replicas=config.replicas,
                        duplicate_window=config.duplicate_window_s,
                    )
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != 10058:  # "stream name already in use": someone made it first
                        await nc.close()
                        raise
                except BaseException:
                    await nc.close()
                    raise
            self.nc, self.js = nc, js
        return int(self.nc.max_payload)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self.closing:
            log.warning("jetstream sink disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("jetstream sink reconnected to %s", self.nc.connected_url.netloc if self.nc else "?")

    async def publish(self, messages: Sequence[Message]) -> _Sent:
        """Publish every message and wait for every ack; retry failures with the same id
        until ``retry_for_s``; raise the last error past it.

        Order: messages go out in order, up to ``max_unacked`` at a time. After a failure
        (and until a call succeeds whole) the first message of an attempt goes alone and
        the rest only once it is acknowledged, so a stream that is still electing a leader
        or a server that is still down fails that one message instead of storing later
        ones ahead of earlier ones. A message that fails in the middle of a window while
        later ones succeed (a leader lost at that moment) is stored after them."""
        sent = _Sent()
        deadline = time.monotonic() + self.config.retry_for_s
        todo = list(messages)
        attempt = 0
        while True:
            last_error: BaseException | None = None
            if not self.healthy and todo:
                failed, last_error = await self._attempt(todo[:1], sent)
                if failed:
                    failed = todo
                else:
                    self.healthy = True
                    failed, last_error = await self._attempt(todo[1:], sent)
            else:
                failed, last_error = await self._attempt(todo, sent)
            if not failed:
                return sent
            self.healthy = False
            attempt += 1
            sent.retried += len(failed)
            if time.monotonic() >= deadline:
                assert last_error is not None
                raise last_error
            _raise_if_cancelled()
            await asyncio.sleep(min(0.05 * attempt, 0.5))
            todo = failed

    async def _attempt(
        self, todo: Sequence[Message], sent: _Sent
    ) -> tuple[list[Message], BaseException | None]:
        """One try of each message in ``todo``: the ones that failed (in order), and the last error."""
        import nats.errors

        js = self.js
        futures: list[asyncio.Future[Any]] = []
        last_error: BaseException | None = None
        try:
            try:
                for message in todo:  # publish_async waits while the window is full
                    headers = {"Nats-Msg-Id": message.msg_id}
                    futures.append(await js.publish_async(message.subject, message.payload, headers=headers))
            except (nats.errors.Error, OSError) as exc:  # disconnected with a full buffer…
                last_error = exc
            _raise_if_cancelled()  # nats-py turns a cancelled wait for the window into an error
            failed: list[Message] = []
            if futures:  # one wait for all the acks (a wait_for per message costs ~10 % of a batch)
                await asyncio.wait(futures, timeout=self.config.ack_timeout_s)
            for message, future in zip(todo, futures, strict=False):
                if not future.done() or future.cancelled():  # cancelled: nats-py closing
                    last_error = TimeoutError(f"no ack within ack_timeout_s ({self.config.ack_timeout_s} s)")
                    failed.append(message)
                    continue
                error = future.exception()
                if error is not None:
                    last_error = error
                    failed.append(message)
                    continue
                if future.result().duplicate:
                    sent.duplicates += 1
            failed.extend(todo[len(futures) :])
            return failed, last_error
        finally:
            # An ack nobody waits for any more would hold its place in the window for good.
            for future in futures:
                if not future.done():
                    future.cancel()

    async def close(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        self.closing = True
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 5)
            except Exception as exc:
                log.debug("nats close: %s", exc)


class JetStreamSink(BatchSink):
    Config = JetStreamConfig
    config: JetStreamConfig

    def __init__(self, config: JetStreamConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._encoder = JsonLinesEncoder()
        self._json_lines = msgspec.json.Decoder()
        self._msgpack = msgspec.msgpack.Encoder()
        self._node = subject_token(config.node or socket.gethostname())
        self._prefix = ".".join(subject_token(t) for t in config.subject_prefix.split("."))
        self._bridge: AsyncioThread | None = None
        self._client = _Client(config)
        self._max_bytes = 0
        self.published_messages = 0
        self.acked_events = 0
        self.duplicate_messages = 0
        self.retried_messages = 0
        self.replayed_events = 0

    @classmethod
    def resolve_config(cls, config: JetStreamConfig, settings: Settings) -> JetStreamConfig:
        if not config.servers:
            raise ConfigError("servers", "at least one server URL is needed")
        if not config.stream or not re.fullmatch(r"[A-Za-z0-9_-]+", config.stream):
            raise ConfigError("stream", f"not a stream name (letters, digits, _ and -): {config.stream!r}")
        if not config.node:
            config = msgspec.structs.replace(config, node=socket.gethostname())
        return config

    async def write(self, batch: Batch) -> None:
        if len(batch) == 0:
            return
        lines = b"".join(await self._encoder.encode_batch(batch))
        await self._send(run_id(), batch.source, batch.seq, batch.event_name, lines)

    async def write_spooled(self, batches: Sequence[SpooledBatch]) -> None:
        """Deliver batches the breaker spooled (their JSON lines), with the ids their first
        try had, all in one bridge call."""
        max_bytes = await self._connect()
        messages = [
            message
            for b in batches
            for message in self.messages(b.run, b.source, b.seq, b.event_name, b.lines, max_bytes)
        ]
        await self._publish(messages)
        self.replayed_events += sum(b.events for b in batches)

    def messages(
        self, run: str, source: str, seq: int, event: str, lines: bytes, max_bytes: int
    ) -> list[Message]:
        """The messages for one batch's JSON lines (pure: the same input, the same messages)."""
        subject = f"{self._prefix}.{self._node}.{subject_token(source)}.{subject_token(event)}"
        out = []
        for chunk, (start, end, events) in enumerate(
            chunk_ranges(lines, self.config.max_events_per_message, max_bytes)
        ):
            payload = lines[start:end]
            if self.config.format == "msgpack":
                payload = self._msgpack.encode(self._json_lines.decode_lines(payload))
            out.append(
                Message(subject, payload, message_id(self._node, run, source, seq, event, chunk), events)
            )
        return out

    async def _connect(self) -> int:
        """Connected (or reconnecting): the bytes a message may carry."""
        if self._bridge is None:
            self._bridge = AsyncioThread(f"jetstream-{self.ctx.name}")
        if not self._max_bytes or not self._client.connected:
            max_payload = await self._bridge.run(self._client.connect())
            self._max_bytes = max(max_payload - HEADER_ROOM_BYTES, 1)
        return self._max_bytes

    async def _send(self, run: str, source: str, seq: int, event: str, lines: bytes) -> None:
        max_bytes = await self._connect()
        await self._publish(self.messages(run, source, seq, event, lines, max_bytes))

    async def _publish(self, messages: list[Message]) -> None:
        assert self._bridge is not None
        sent = await self._bridge.run(self._client.publish(messages))
        self.published_messages += len(messages)
        self.acked_events += sum(m.events for m in messages)
        self.duplicate_messages += sent.duplicates
        self.retried_messages += sent.retried

    async def aclose(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await bridge.run(self._client.close())
            finally:
                await trio.to_thread.run_sync(bridge.stop)

    def statistics(self) -> JetStreamStatistics:
        return JetStreamStatistics(
            connected=self._client.connected,
            published_messages=self.published_messages,
            acked_events=self.acked_events,
            duplicate_messages=self.duplicate_messages,
            retried_messages=self.retried_messages,
            replayed_events=self.replayed_events,
        )
