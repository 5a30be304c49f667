"""RingBufferReader: the source that takes events from a BPF program's ring buffer.

It loads the program, maps its ring buffer (:class:`bpf.ringbuf.RingBuffer`),
sleeps until it is time to read (see Wake-ups) and then copies every committed
record out with one slice. Nothing is decoded here: each batch is a
:func:`stages.raw_records.raw_batch` (one row per record, the copied bytes and
the program's schema as payload), so :class:`stages.decoder.Decoder` needs no
config of its own. A stage between the two may filter rows (e.g. by
``type``) for free.

Accounting
----------
The arithmetic is :class:`pipeline.ring_accounting.RingAccountant`'s (its module
docstring states the rules); this shell feeds it. It reads the kernel counters
after consuming the ring (see ``stats_interval_s`` for how often). At shutdown
(``Pipeline.stop()`` cancels the source) it detaches the program first, so
nothing new arrives; reads the rest of the ring and sends it on (shielded), or
records it as ``DRAINED`` if it cannot be sent before ``shutdown_timeout_s``;
and reads the final counters once every in-flight BPF invocation has finished.
Then the source's ledger balances exactly::

    produced == sent + kernel_sampled_out + lost_on_reserve + drained

Run by the agent (``bpfpipe run``), shutdown follows the seed's order instead
(``pipeline._lifecycle``): after :meth:`RingBufferReader.defer_program_shutdown`,
stopping only stops reading — what the ring holds at that moment is sent on
(in flight), the program stays attached while the chain drains — and the agent
then calls :meth:`~RingBufferReader.detach_programs` (what the kernel wrote
since reading stopped is recorded as drained, reason ``shutdown: after stop
reading``), :meth:`~RingBufferReader.close_maps` and
:meth:`~RingBufferReader.unload_programs`. The same equation holds.

Weights: a record stands for ``rate`` events (its header's sampling rate), so
sampled-out events carry weight 0 (the kept ones stand for them), and lost or
drained events the rate last seen in the ring.

Wake-ups
--------
Every batch has a fixed cost (a wake-up, a channel hop per stage, a write), so
a trickle of events must not mean a trickle of 1-event batches. The kernel
(bpfpipe.h) wakes the reader only once ``wakeup_watermark`` of the ring is
pending; the reader reads when :func:`next_read_at` says so: at once past that
watermark, otherwise at the latest ``max_batch_delay_ms`` after its last read, on
the grid of :mod:`pipeline.ticks` that the agent's other periodic work shares
(the latency budget, as Vector's batch timeout or Kafka's ``linger.ms``). A
wake-up is read at once, also when the ring holds a little less than the
watermark: the kernel's count since the reader's reset includes records that
arrived just before the last read took them, and past the watermark the kernel
does not wake the reader again until the next reset — lingering until the budget
lost events whenever the budget holds more than the ring (100 ms at 100 k
events/s in a 256 KiB ring). The reader waits on an
edge-triggered epoll of the ring, so records left in the ring on purpose do
not make it readable again. Cancellation (shutdown) ends any wait at once, and
waiting never delays a blocked send's drain checks (they run while sending).
A program without the moderation map (``ring_wakeup`` None), or a watermark of
0, is read as soon as anything is committed, as before. While the program's
sampling gate samples (the sampler shedding load), ``sampling_wakeup_watermark``
takes the place of ``wakeup_watermark``: the ring then fills at about the
consumer's pace, and smaller batches keep what is delivered young.

Overflow: with ``overflow = "drain_oldest"``, while a send is blocked the reader
asks :class:`pipeline.drain.DrainPolicy` every ``drain_check_s`` whether to skip
the oldest records, skips them and warns once per overload episode.
"""

from __future__ import annotations

import math
import select
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol

import msgspec
import trio

import pipeline
from bpf.ringbuf import RingBuffer, RingRead, SkipResult
from pipeline import (
    Batch,
    BatchSender,
    HeartbeatSource,
    MonotonicTimer,
    Outcome,
    ProgramHealth,
    SamplingGate,
    Source,
    StageContext,
    TrimmableMaps,
    last_tick_by,
    next_tick,
)
from pipeline.drain import DrainPolicy
from pipeline.ring_accounting import KernelCounters, LedgerStep, RingAccountant

from .raw_records import EventSchema, EventTypes, raw_batch

__all__ = [
    "ReadableRing",
    "RingBufferReader",
    "RingBufferReaderConfig",
    "RingBufferReaderStatistics",
    "RingProgram",
    "RingWakeup",
    "next_read_at",
]

# -- what the reader needs from the loader and the ring -----------------------------------


class RingProgram(EventTypes, Protocol):
    """What the reader uses of ``bpf.loader.LoadedProgram``: its event types (for the
    schema), its ring and its counters. An optional ``detach()`` (stop the program,
    keep its maps) makes shutdown exact even if ``kernel_stats()`` stops working
    after ``close()``; an optional ``ring_wakeup`` (a :class:`RingWakeup`, or None)
    moderates the kernel's wake-ups; an optional ``heartbeat`` (a
    :class:`pipeline.HeartbeatSource`, or None) is published for the health monitor."""

    @property
    def name(self) -> str: ...
    @property
    def ring_map_fd(self) -> int: ...
    @property
    def ring_size_bytes(self) -> int: ...
    def kernel_stats(self) -> Mapping[str, int]: ...
    def close(self) -> None: ...


class RingWakeup(Protocol):
    """The kernel's wake-up moderation (``bpf.programs.RingWakeup``, bpfpipe.h)."""

    def set_threshold(self, threshold_bytes: int) -> None: ...
    def reset_pending(self) -> None: ...


class ReadableRing(Protocol):
    """The consumer side of a ring (:class:`bpf.ringbuf.RingBuffer` or ``SimulatedRing``)."""

    @property
    def size_bytes(self) -> int: ...
    def read_batch(self, max_records: int | None = None) -> RingRead: ...
    def skip(self, *, max_records: int | None = None, min_bytes: int | None = None) -> SkipResult: ...
    def usage(self) -> float: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


# -- when to read: the pure core -----------------------------------------------------------


def next_read_at(
    *, now: float, last_read: float, pending_bytes: int, threshold_bytes: int, max_batch_delay_s: float
) -> float:
    """When to read the ring next (``<= now``: at once; ``inf``: when woken).

    Rules, with ``pending_bytes`` the ring's unread bytes now:

    * moderation off (``threshold_bytes == 0``: every event wakes the reader):
      at once if anything is pending, else when woken;
    * ``pending_bytes >= threshold_bytes``: at once (the batch is big enough);
    * otherwise the last multiple of ``max_batch_delay_s`` on trio's clock by
      ``last_read + max_batch_delay_s``: nothing that arrived since the last read
      waits longer than the budget. (A wake-up from the kernel is read at once,
      whatever this says: see the module docstring.) An empty ring waits the same
      way: the kernel wakes the reader if the threshold is crossed meanwhile. On the
      grid, because the agent's other periodic work ticks on it too
      (``pipeline.ticks``): one wake-up serves all.
    """
    if threshold_bytes <= 0:
        return now if pending_bytes > 0 else math.inf
    if pending_bytes >= threshold_bytes:
        return now
    return last_tick_by(last_read + max_batch_delay_s, max_batch_delay_s, last_read)


IDLE_STATS_INTERVAL_S = 1.0
"""How often the reader reads the kernel counters while they can only have counted
records already credited: nothing sampled out, nothing lost (see ``LOSS_POSSIBLE_USAGE``)."""
LOSS_POSSIBLE_USAGE = 0.75
"""Once the ring is seen at least this full (before a read, by a drain check or a
scrape), reservations may have failed for want of room: the counters are then read at
the next ``stats_interval_s`` tick, to account for the losses promptly. Below it the
ring had room for any record up to a quarter of its size (the ring only fills between
two looks, except by a drain, which looks too)."""

# -- the stage ---------------------------------------------------------------------------

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class RingBufferReaderConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    program: str = "exec"
    """Which BPF program to load (``bpf/<program>.bpf.c``)."""
    options: dict[str, Any] = {}
    """Program options, passed to the loader (e.g. filters compiled in)."""
    ring_buffer_size: Annotated[int, msgspec.Meta(ge=4096)] | None = None
    """Ring buffer bytes (a power of two, whole pages); default: the program's."""
    map_size: PositiveInt | None = None
    """Entries of the program's hash maps; default: the program's."""
    max_batch_records: Annotated[int, msgspec.Meta(ge=1, le=1 << 24)] = 65536
    """Most records per batch; a fuller ring is read in several batches."""
    idle_poll_s: Seconds = 0.25
    """Longest sleep without a wake-up from the ring."""
    max_batch_delay_ms: Annotated[float, msgspec.Meta(gt=0, le=60_000)] = 100.0
    """Latency budget: an event waits in the ring at most this long (plus the time to
    send the batch before it) before it is read. Below ``wakeup_watermark`` the
    kernel does not wake the reader, so this is how often a trickle is read. 100 ms:
    below saturation the agent's CPU is its wake-ups (each ~0.4-1 ms of CPU here,
    the interpreter cold again after the pause), so halving the polls halves it —
    measured 2026-12-03, loadgen at 1 k events/s, null sink: 50 ms 24 ms of CPU a
    second, 100 ms 15 (a bcc consumer: 34); idle at 100 ms, 7. An operator tailing
    the output still sees no lag; latency-sensitive consumers lower it."""
    wakeup_watermark: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.5
    """Ring usage (a fraction of the ring) at which the kernel wakes the reader; 0
    wakes it for every event (no moderation). 1/2: half the ring per batch, and
    still 0.4 of it for a burst before draining starts at 0.9. Measured 2026-12-03,
    loadgen at 100 k events/s (100 ms budget), agent CPU per second, null / jsonl:
    1/8 106 / 240 ms, 1/4 68 / 164 ms, 1/2 44 / 112 ms (a bcc consumer: 206);
    at 1 M/s the ring lost 1.3 % / 0.2 % / 2.0 % of events (saturated either way)."""
    sampling_wakeup_watermark: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.25
    """The wake-up watermark while the program's sampling gate samples (rate > 1): the
    pipeline is shedding load then, so the ring fills at about what the consumer
    downstream takes, not at what the batch cost calls for, and half a ring would be
    latency that saves nothing. Measured 2026-12-03, ``bench/overload.py``
    kernel_sampler (500 k events/s offered, a 50 k/s sink, all on one CPU): mean age
    of the delivered batches once settled 1/2 0.133 s, 1/4 0.062 s, 1/8 0.039 s; the
    sink's share delivered 0.93, 0.92, 0.87 (the extra reads take its CPU)."""
    stats_interval_s: Seconds = 0.1
    """How often to read the kernel counters (and account for sampled and lost events)
    while the program's gate samples or the ring was seen at least three quarters full
    (``LOSS_POSSIBLE_USAGE``); otherwise once a second (``IDLE_STATS_INTERVAL_S``)."""
    shutdown_timeout_s: Seconds = 2.0
    """At shutdown, how long to wait for downstream room and in-flight BPF runs."""
    overflow: Literal["drain_oldest", "block"] = "drain_oldest"
    """What to do while downstream cannot accept. ``block``: back-pressure only — the
    ring fills and the kernel then fails reservations (counted as lost_on_reserve):
    the *newest* events are lost and the ring holds stale ones. ``drain_oldest``:
    past ``drain_high_watermark`` of ring usage (or under memory pressure) skip the
    oldest records unread (counted as drained) so the kernel keeps writing fresh
    events: the *oldest* are lost and what is delivered stays current."""
    drain_high_watermark: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9
    """Ring usage at which draining starts (while downstream is blocked)."""
    drain_low_watermark: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.5
    """Ring usage draining brings the ring down to."""
    drain_check_s: Seconds = 0.01
    """While blocked sending, how often to look at ring usage and memory pressure."""

    def __post_init__(self) -> None:
        if self.drain_low_watermark >= self.drain_high_watermark:
            raise ValueError(
                f"drain_low_watermark ({self.drain_low_watermark}) must be below "
                f"drain_high_watermark ({self.drain_high_watermark})"
            )
        for name in ("wakeup_watermark", "sampling_wakeup_watermark"):
            if getattr(self, name) >= self.drain_high_watermark:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be below "
                    f"drain_high_watermark ({self.drain_high_watermark})"
                )


@dataclass(frozen=True, slots=True)
class RingBufferReaderStatistics:
    ring_size_bytes: int
    ring_usage: float
    """Fraction of the ring in use now (read from the ring's positions; after the ring
    is closed, as last looked at)."""
    peak_ring_usage: float
    batches: int
    records_read: int
    bytes_read: int
    """Ring bytes consumed by reads (records with their 8-byte headers, padding included)."""
    records_drained: int
    records_discarded: int
    wakeups: int
    """Waits ended by the ring (the kernel's wake-ups)."""
    idle_timeouts: int
    """Waits ended by a deadline: the latency budget, ``idle_poll_s`` or a counter read due
    (see ``stats_interval_s``)."""
    wakeup_threshold_bytes: int
    """The kernel's wake-up threshold in effect (0: every event wakes the reader)."""
    kernel: KernelCounters


class RingBufferReader(Source):
    """Reads a BPF program's ring buffer; one batch of raw records per read."""

    Config = RingBufferReaderConfig
    config: RingBufferReaderConfig
    follow_with: ClassVar[tuple[tuple[str, str], ...]] = (("decoder", "stages.decoder:Decoder"),)
    """Raw records need decoding: the graph builder puts a decoder right after this source."""

    def __init__(self, config: RingBufferReaderConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.program: RingProgram | None = None
        self.schema: EventSchema | None = None
        self._last_usage = 0.0
        self._ring_was_full = False
        """Usage reached ``LOSS_POSSIBLE_USAGE`` since the counters were last read."""
        self.peak_ring_usage = 0.0
        self._ring: ReadableRing | None = None
        self._ring_size_bytes = 0
        self._accountant = RingAccountant()
        self._unsent: Batch | None = None
        self._last_rate = 1.0
        self._seq = 0
        self._records_read = 0
        self._bytes_read = 0
        self._records_drained = 0
        self._records_discarded = 0
        self._wakeups = 0
        self._idle_timeouts = 0
        self._wakeup: RingWakeup | None = None
        self._wakeup_threshold_bytes = 0
        self._drain_policy = DrainPolicy(config.drain_high_watermark, config.drain_low_watermark)
        self._draining = False
        self._deferred = False
        """The agent runs the late shutdown steps (see Shutdown in the module docstring)."""
        self._detached_by_owner = False
        self._unloaded = False

    # -- hooks (tests override these with simulated ones) -----------------------------
    @classmethod
    def resolve_config(
        cls, config: RingBufferReaderConfig, settings: pipeline.Config
    ) -> RingBufferReaderConfig:
        """Sizes default to the top-level ``ring_buffer_size``/``bpf_map_size``; the program
        name and its options are checked here, without compiling anything."""
        from bpf.loader import validate_options, validate_program_name

        validate_program_name(config.program)
        validate_options(config.program, config.options)
        return msgspec.structs.replace(
            config,
            ring_buffer_size=config.ring_buffer_size or settings.ring_buffer_size,
            map_size=config.map_size or settings.bpf_map_size,
        )

    def load_program(self) -> RingProgram:
        """Compile, load and attach the configured program (runs in a worker thread)."""
        from bpf.loader import load_program

        cfg = self.config
        program: RingProgram = load_program(
            cfg.program,
            ring_buffer_size=cfg.ring_buffer_size or self.ctx.settings.ring_buffer_size,
            map_size=cfg.map_size or self.ctx.settings.bpf_map_size,
            options=dict(cfg.options),
            prepare=self._prepare_maps,
        )
        return program

    def _prepare_maps(self, program: RingProgram) -> None:
        """Initial map values, before the program is attached: the wake-up threshold."""
        wakeup: RingWakeup | None = getattr(program, "ring_wakeup", None)
        if wakeup is not None:
            wakeup.set_threshold(int(self.config.wakeup_watermark * program.ring_size_bytes))

    def open_ring(self, program: RingProgram) -> ReadableRing:
        return RingBuffer(program.ring_map_fd, program.ring_size_bytes)

    # -- public ------------------------------------------------------------------------
    @property
    def accountant(self) -> RingAccountant:
        return self._accountant

    def statistics(self) -> RingBufferReaderStatistics:
        return RingBufferReaderStatistics(
            ring_size_bytes=self._ring_size_bytes,
            ring_usage=self.ring_usage,
            peak_ring_usage=self.peak_ring_usage,
            batches=self._seq,
            records_read=self._records_read,
            bytes_read=self._bytes_read,
            records_drained=self._records_drained,
            records_discarded=self._records_discarded,
            wakeups=self._wakeups,
            idle_timeouts=self._idle_timeouts,
            wakeup_threshold_bytes=self._wakeup_threshold_bytes,
            kernel=self._accountant.kernel,
        )

    def drain_oldest(
        self, *, max_records: int | None = None, min_bytes: int | None = None, reason: str = "ring full"
    ) -> int:
        """Skip the oldest committed records without reading them, to give the kernel
        room for fresh events; they are recorded as ``Outcome.DRAINED``. Returns how
        many were skipped. The flow-control policy decides when to call this."""
        if self._ring is None:
            raise RuntimeError("the reader is not running")
        result = self._ring.skip(max_records=max_records, min_bytes=min_bytes)
        self._records_drained += result.records
        self._records_discarded += result.discarded
        produced = self._accountant.took(result.records)
        if produced:
            self.ctx.produced(produced)
        self.ctx.record_unadmitted(
            Outcome.DRAINED, result.records, result.records * self._last_rate, reason=reason
        )
        return result.records

    # -- the task ----------------------------------------------------------------------
    async def run(
        self, tx: BatchSender, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Compiling takes a while, so in a worker thread. The call cannot be cancelled:
        # stop() meanwhile takes effect at the first checkpoint after it, in _pump,
        # and the shutdown then detaches and closes the program as usual.
        program = await trio.to_thread.run_sync(self.load_program)
        try:
            self.schema = EventSchema.from_program(program)
            self._ring = self.open_ring(program)
        except BaseException:
            program.close()
            raise
        self.program = program
        self._ring_size_bytes = self._ring.size_bytes
        self._wakeup = getattr(program, "ring_wakeup", None)
        if self._wakeup is not None:
            self._wakeup_threshold_bytes = int(self.config.wakeup_watermark * self._ring_size_bytes)
            self._wakeup.set_threshold(self._wakeup_threshold_bytes)
        if isinstance(program, SamplingGate | TrimmableMaps | ProgramHealth):
            self.ctx.publish(program)  # its gate to the sampler, its maps to the enforcer
        heartbeat = getattr(program, "heartbeat", None)
        if isinstance(heartbeat, HeartbeatSource):
            self.ctx.publish(heartbeat)  # the health monitor's end-to-end probe
        self.ctx.log.info(
            "reading ring buffer of BPF program %r (%d bytes)",
            program.name,
            self._ring.size_bytes,
            extra={"stage": self.ctx.name},
        )
        task_status.started()
        try:
            await self._pump(tx)
        finally:
            with trio.CancelScope(shield=True):
                if self._deferred:
                    await self._stop_reading(tx)
                else:
                    await self._shutdown(tx)

    async def _pump(self, tx: BatchSender) -> None:
        cfg = self.config
        ring = self._ring
        assert ring is not None
        wakeup = self._wakeup
        threshold = self._wakeup_threshold_bytes
        thresholds = (  # by whether the program's gate samples
            int(cfg.wakeup_watermark * ring.size_bytes),
            int(cfg.sampling_wakeup_watermark * ring.size_bytes),
        )
        budget_s = cfg.max_batch_delay_ms / 1000
        # Edge-triggered: woken by the kernel's wake-ups only, not by records left
        # in the ring on purpose (a ring fd polls readable while anything is unread).
        edges = select.epoll()
        # The wait's deadline as a timerfd in the same epoll set: a timeout is then a
        # readable fd, not a cancelled scope (pipeline.timerfd says what that saves).
        # Not under a test's virtual clock, which a kernel timer would not follow.
        real_clock = type(trio.lowlevel.current_clock()).__name__ == "SystemClock"
        timer: MonotonicTimer | None = None
        try:
            edges.register(ring.fileno(), select.EPOLLIN | select.EPOLLET)
            if real_clock:
                try:
                    timer = MonotonicTimer()
                    edges.register(timer.fileno(), select.EPOLLIN)
                except OSError as exc:  # out of fds, or a sandbox without timerfd: the old way
                    self.ctx.log.warning(
                        "no timerfd for the reader's waits (%s); waiting with trio deadlines",
                        exc,
                        extra={"stage": self.ctx.name},
                    )
                    if timer is not None:
                        timer.close()
                        timer = None
            next_stats = next_tick(trio.current_time(), cfg.stats_interval_s)
            idle_stats_s = max(cfg.stats_interval_s, IDLE_STATS_INTERVAL_S)
            unrefreshed = False  # records read since the counters were last read
            self._ring_was_full = False
            last_refresh = trio.current_time()
            while True:
                if wakeup is not None:
                    wanted = thresholds[getattr(self.program, "gate_rate", 1) > 1]
                    if wanted != threshold:
                        threshold = self._wakeup_threshold_bytes = wanted
                        wakeup.set_threshold(wanted)
                    wakeup.reset_pending()  # before reading: whatever comes later counts
                self._observe_usage(ring.usage())
                read = ring.read_batch(cfg.max_batch_records)
                last_read = trio.current_time()
                await self._send_read(tx, read)
                unrefreshed = unrefreshed or read.records > 0
                # The counters change what the ledger holds only with events the gate sampled
                # out or the ring lost; the records read are credited as they are sent. So
                # they are read every stats_interval_s while either can happen (the gate
                # samples, or the ring was seen nearly full: see _observe_usage), else every
                # idle_stats_s; and the reader wakes for them only then.
                sampling = getattr(self.program, "gate_rate", 1) > 1
                if (unrefreshed and sampling) or self._ring_was_full:
                    refresh_at = next_stats
                else:
                    refresh_at = max(next_stats, last_refresh + idle_stats_s)
                now = trio.current_time()
                if now >= refresh_at:
                    self._refresh_counters()
                    unrefreshed = self._ring_was_full = False
                    last_refresh = now
                    refresh_at = max(next_tick(now, cfg.stats_interval_s), now + idle_stats_s)
                if now >= next_stats:
                    next_stats = next_tick(now, cfg.stats_interval_s)
                if read.records >= cfg.max_batch_records:
                    continue  # probably more waiting; sending was a checkpoint
                while True:
                    now = trio.current_time()
                    read_at = next_read_at(
                        now=now,
                        last_read=last_read,
                        pending_bytes=int(ring.usage() * ring.size_bytes),
                        threshold_bytes=threshold,
                        max_batch_delay_s=budget_s,
                    )
                    if read_at <= now:
                        break
                    deadline = min(read_at, refresh_at, now + cfg.idle_poll_s)
                    if timer is not None:
                        timer.arm(deadline - now)
                        await trio.lowlevel.wait_readable(edges.fileno())
                        woken = any(fd != timer.fileno() for fd, _ in edges.poll(0))  # consumes the edge
                    else:
                        with trio.move_on_at(deadline) as wait:
                            await trio.lowlevel.wait_readable(edges.fileno())
                        woken = not wait.cancelled_caught
                        if woken:
                            edges.poll(0)  # consume the edge
                    if not woken:
                        self._idle_timeouts += 1
                        break
                    self._wakeups += 1
                    # The kernel woke us: read now, even if the ring holds a little less than
                    # the threshold (its count since our reset includes records the last read
                    # took). It wakes once per crossing until we reset: lingering until the
                    # budget would leave nothing to wake us meanwhile, and at 100 k events/s
                    # a 100 ms budget is more than the ring holds.
                    break
        finally:
            trio.lowlevel.notify_closing(edges.fileno())
            edges.close()
            if timer is not None:
                timer.close()

    @property
    def ring_usage(self) -> float:
        """Fraction of the ring in use now: two loads from the ring's mapped pages, so
        a scrape sees the ring as it is, also while the reader waits on downstream."""
        if self._ring is not None:
            self._observe_usage(self._ring.usage())
        return self._last_usage

    def _observe_usage(self, usage: float) -> None:
        self._last_usage = usage
        if usage >= LOSS_POSSIBLE_USAGE:  # reservations may fail: read the counters promptly
            self._ring_was_full = True
        if usage > self.peak_ring_usage:
            self.peak_ring_usage = usage

    def _take(self, read: RingRead) -> Batch | None:
        """Account for one ring read; the batch to send, if it holds records."""
        self._records_discarded += read.discarded
        if not read.records:
            return None
        assert self.schema is not None
        self._records_read += read.records
        self._bytes_read += len(read.raw)
        batch = raw_batch(read, self.schema, source=self.ctx.name, seq=self._seq)
        self._seq += 1
        self._last_rate = float(batch.weights[-1])
        produced = self._accountant.took(read.records)
        if produced:
            self.ctx.produced(produced)
        return batch

    async def _send_read(self, tx: BatchSender, read: RingRead) -> None:
        batch = self._take(read)
        if batch is None:
            return
        self._unsent = batch
        if self.config.overflow == "block":
            await tx.send(batch)
        elif tx.has_room(batch):  # the usual case: no drain check needed, so no cancel scope
            await tx.send(batch)
            self._draining = False
        else:
            waited = False
            while True:
                with trio.move_on_after(self.config.drain_check_s) as blocked:
                    await tx.send(batch)
                if not blocked.cancelled_caught:
                    break
                waited = True
                self._drain_if_needed()
            if not waited:  # downstream keeps up again: the next drain is a new episode, and says so
                self._draining = False
        self._unsent = None

    def _drain_if_needed(self) -> int:
        """Downstream is blocked: drain what the policy says (oldest records first)."""
        ring = self._ring
        assert ring is not None
        usage = ring.usage()
        self._observe_usage(usage)
        drain = self._drain_policy.decide(usage, ring.size_bytes, memory_pressure=self.ctx.pressure.memory)
        if drain is None:
            return 0
        drained = self.drain_oldest(min_bytes=drain.min_bytes, reason=drain.reason)
        if drained and not self._draining:
            self.ctx.log.warning(
                "downstream blocked: draining oldest ring-buffer records",
                extra={"stage": self.ctx.name, "reason": drain.reason, "ring_usage": round(usage, 3)},
            )
        self._draining = drained > 0
        return drained

    def _refresh_counters(self) -> None:
        assert self.program is not None
        self._apply(self._accountant.observe(KernelCounters.from_stats(self.program.kernel_stats())))

    def _apply(self, step: LedgerStep) -> None:
        ctx = self.ctx
        if step.produced:
            ctx.produced(step.produced)
        # Sampled-out events are represented by the kept events' weights.
        ctx.record_unadmitted(Outcome.KERNEL_SAMPLED_OUT, step.sampled_out, 0.0)
        ctx.record_unadmitted(Outcome.LOST_ON_RESERVE, step.lost_reserve, step.lost_reserve * self._last_rate)

    # -- shutdown ----------------------------------------------------------------------
    def _stop_program(self) -> bool:
        """Stop new events. Returns True if that closed the program (no ``detach``)."""
        program = self.program
        assert program is not None
        detach = getattr(program, "detach", None)
        if callable(detach):
            detach()
            return False
        program.close()
        return True

    def _final_counters(self) -> KernelCounters | None:
        assert self.program is not None
        try:
            return KernelCounters.from_stats(self.program.kernel_stats())
        except Exception as exc:
            self.ctx.log.warning(
                "cannot read kernel counters after stopping program %r (%s); accounting from "
                "the last counters read",
                self.program.name,
                exc,
                extra={"stage": self.ctx.name},
            )
            return None

    async def _send_or_drain(self, tx: BatchSender, batch: Batch, deadline: float) -> None:
        with trio.CancelScope(deadline=deadline):
            try:
                await tx.send(batch)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.ctx.record_unadmitted(
            Outcome.DRAINED, len(batch), batch.weight_sum, reason="shutdown: downstream did not accept"
        )

    async def _shutdown(self, tx: BatchSender) -> None:
        if self.program is None or self._ring is None:
            return
        ring = self._ring
        deadline = trio.current_time() + self.config.shutdown_timeout_s
        closed = False
        try:
            closed = self._stop_program()
            if self._unsent is not None:  # cancelled while sending
                unsent, self._unsent = self._unsent, None
                await self._send_or_drain(tx, unsent, deadline)
            while True:
                while True:
                    read = ring.read_batch(self.config.max_batch_records)
                    if not (read.records or read.discarded):
                        break
                    batch = self._take(read)
                    if batch is not None:
                        await self._send_or_drain(tx, batch, deadline)
                if self._settled(closed, deadline):
                    break
                await trio.sleep(0.001)  # a program run on another CPU is finishing
            self._abandon_residual()
        finally:
            if not closed:
                self.program.close()
            trio.lowlevel.notify_closing(ring.fileno())
            ring.close()
            self._ring = None

    def _abandon_residual(self) -> None:
        """The shutdown deadline passed: what never became readable is drained."""
        assert self.program is not None
        residual = self._accountant.abandon()
        if residual:
            self.ctx.log.warning(
                "%d events of program %r never became readable before the shutdown "
                "deadline; recorded as drained",
                residual,
                self.program.name,
                extra={"stage": self.ctx.name},
            )
            self.ctx.record_unadmitted(
                Outcome.DRAINED, residual, residual * self._last_rate, reason="shutdown: unreadable"
            )
        elif self._accountant.unresolved < 0:
            self.ctx.log.warning(
                "kernel counters of program %r account for %d fewer events than were read",
                self.program.name,
                -self._accountant.unresolved,
                extra={"stage": self.ctx.name},
            )

    # -- shutdown run by the agent, in the seed's order (pipeline._lifecycle) ----------
    def defer_program_shutdown(self) -> None:
        """Stopping will only stop reading: the program stays attached (and the ring
        mapped) until :meth:`detach_programs`, :meth:`close_maps` and
        :meth:`unload_programs` are called, after the chain has drained."""
        self._deferred = True

    async def _stop_reading(self, tx: BatchSender) -> None:
        """Deferred stop: send on what the ring holds now (events that happened before
        the stop: in flight), then return with the program attached."""
        ring = self._ring
        if self.program is None or ring is None:
            return
        deadline = trio.current_time() + self.config.shutdown_timeout_s
        if self._unsent is not None:  # cancelled while sending
            unsent, self._unsent = self._unsent, None
            await self._send_or_drain(tx, unsent, deadline)
        while True:
            read = ring.read_batch(self.config.max_batch_records)
            batch = self._take(read)
            if batch is not None:
                await self._send_or_drain(tx, batch, deadline)
            if read.records < self.config.max_batch_records or trio.current_time() >= deadline:
                break

    async def detach_programs(self, *, wait_s: float) -> tuple[int, int]:
        """Detach; what the kernel wrote since reading stopped is recorded as drained
        (reason ``shutdown: after stop reading``), waiting up to ``wait_s`` for program
        runs in flight on other CPUs. Returns (programs detached: 0 or 1, those events)."""
        ring = self._ring
        if self.program is None or ring is None or self._detached_by_owner:
            return 0, 0
        self._detached_by_owner = True
        closed = self._stop_program()
        deadline = trio.current_time() + wait_s
        after_stop = 0
        while True:
            while skipped := self.drain_oldest(reason="shutdown: after stop reading"):
                after_stop += skipped
            if self._settled(closed, deadline):
                break
            await trio.sleep(0.001)
        self._abandon_residual()
        return 1, after_stop

    def _settled(self, closed: bool, deadline: float) -> bool:
        """Read the final counters once and account for them: True once nothing more can
        come (the program is closed, or no run is in flight and every record was read)
        or the deadline has passed."""
        counters = None if closed else self._final_counters()
        if counters is None:
            return True
        self._apply(self._accountant.observe(counters))
        settled = counters.in_flight == 0 and self._accountant.readable_backlog <= 0
        return settled or trio.current_time() >= deadline

    def close_maps(self) -> int:
        """Close user space's handles on the maps: the ring's and the wake-up map's mmaps."""
        closed = 0
        ring, self._ring = self._ring, None
        if ring is not None:
            trio.lowlevel.notify_closing(ring.fileno())
            ring.close()
            closed += 1
        close_wakeup = getattr(self._wakeup, "close", None)
        if callable(close_wakeup):
            close_wakeup()
            closed += 1
        return closed

    def unload_programs(self) -> int:
        """Free the program (bcc's module: program fds and map fds). Idempotent."""
        program = self.program
        if program is None or self._unloaded:
            return 0
        self._unloaded = True
        program.close()  # idempotent: a program without detach() was closed when detached
        return 1
