"""Services stages offer each other, typed: what a source publishes, who gets it.

A stage calls ``ctx.publish(obj)`` once it is running; the runtime files ``obj``
under every service protocol it implements (structural, checked once at
publish time, never per batch) and, when every node has started, wires them:

* a :class:`SamplingGate` (a BPF program's in-kernel gate) goes to every
  :class:`SamplingController` (the adaptive sampler) *downstream* of the stage
  that published it — so with several sources, each sampler controls the gates
  of the sources that feed it;
* a :class:`TrimmableMaps` (a BPF program with growing maps) goes to the
  resource enforcer, which trims it past ``limits.max_map_entries``;
* a :class:`HeartbeatSource` (a source that can make a heartbeat event at its
  origin) and a :class:`ProgramHealth` (a loaded BPF program the readiness
  checks look at) go to the health monitor (``pipeline.health``).

Publishing something that implements none of these is an error: a typo in a
method name should fail at start, not silently leave a gate unwired.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "HEARTBEAT_EVENT",
    "HeartbeatSource",
    "ProgramHealth",
    "Published",
    "SamplingController",
    "SamplingGate",
    "Services",
    "TrimmableMaps",
]

HEARTBEAT_EVENT = "heartbeat"
"""The ``event_name`` of heartbeat batches: one or more agent-made events, each with a
``marker`` field, that prove events flow end to end. Every stage sends them on
untouched (``BatchStage.process`` never sees them; a ``Stage`` with its own ``run``
must forward them), samplers never sample them, and the health monitor consumes
them before the sink (``Outcome.HEARTBEAT``)."""


@runtime_checkable
class SamplingGate(Protocol):
    """The kernel side of sampling: a source with an in-kernel gate provides one."""

    def set_sample_rate(self, rate: int) -> None:
        """From now on the kernel emits 1 event in ``rate`` (and stamps weight ``rate`` on it)."""


@runtime_checkable
class SamplingController(Protocol):
    """A stage that decides the sampling rate and pushes it into gates."""

    def attach_gate(self, gate: SamplingGate) -> None:
        """Take over ``gate``: set its rate now and on every change."""


@runtime_checkable
class TrimmableMaps(Protocol):
    """A BPF program whose maps grow with what it sees (e.g. per-process tables)."""

    @property
    def name(self) -> str: ...

    @property
    def closed(self) -> bool:
        """True once the program is unloaded: its maps are gone."""

    def growing_maps(self) -> Mapping[str, int]:
        """Entry counts of the maps that grow, by map name."""

    def evict_oldest(self, map_name: str, keep: int) -> int:
        """Delete the oldest entries of ``map_name`` down to ``keep``; returns how many."""


@runtime_checkable
class HeartbeatSource(Protocol):
    """A source that can make a heartbeat event where its events originate (a BPF
    program's tracepoint, fired by a syscall the agent makes)."""

    def trigger_heartbeat(self, marker: int) -> None:
        """Soon send one heartbeat batch (``event_name == HEARTBEAT_EVENT``) whose event
        carries ``marker`` (0 <= marker < 2**31) through the pipeline. Never blocks."""


@runtime_checkable
class ProgramHealth(Protocol):
    """A loaded BPF program, as the readiness checks see it. Both calls may block
    briefly (a map lookup, a netlink query): the monitor runs them off the event loop."""

    @property
    def name(self) -> str: ...

    def attachment_problem(self) -> str | None:
        """None while every attachment is in place, else what is not (for people)."""

    def maps_problem(self) -> str | None:
        """None if the program's maps answer a lookup, else what failed (for people)."""


SERVICE_PROTOCOLS: tuple[type, ...] = (SamplingGate, TrimmableMaps, HeartbeatSource, ProgramHealth)


@dataclass(frozen=True, slots=True)
class Published:
    """One published service and the index of the node that published it."""

    node: int
    service: object


@dataclass
class Services:
    """What the pipeline's stages have published, by protocol."""

    sampling_gates: list[Published] = field(default_factory=list)
    trimmable_maps: list[Published] = field(default_factory=list)
    heartbeat_sources: list[Published] = field(default_factory=list)
    program_health: list[Published] = field(default_factory=list)

    def publish(self, node: int, service: object) -> None:
        filed = False
        for protocol, where in (
            (SamplingGate, self.sampling_gates),
            (TrimmableMaps, self.trimmable_maps),
            (HeartbeatSource, self.heartbeat_sources),
            (ProgramHealth, self.program_health),
        ):
            if isinstance(service, protocol):
                where.append(Published(node, service))
                filed = True
        if not filed:
            names = ", ".join(p.__name__ for p in SERVICE_PROTOCOLS)
            raise TypeError(f"{type(service).__name__} implements no service protocol ({names})")

    def gates(self) -> Iterator[SamplingGate]:
        for p in self.sampling_gates:
            assert isinstance(p.service, SamplingGate)
            yield p.service

    def checked_programs(self) -> Iterator[ProgramHealth]:
        for p in self.program_health:
            assert isinstance(p.service, ProgramHealth)
            yield p.service

    def published_programs(self) -> list[object]:
        """Every program published as a sampling gate or with trimmable maps, each once,
        in publishing order, closed ones too (metrics and ``/status`` report them)."""
        seen: dict[int, object] = {}
        for published in (*self.sampling_gates, *self.trimmable_maps):
            seen.setdefault(id(published.service), published.service)
        return list(seen.values())

    def programs(self) -> Iterator[TrimmableMaps]:
        """Trimmable programs that are still loaded."""
        for p in self.trimmable_maps:
            assert isinstance(p.service, TrimmableMaps)
            if not p.service.closed:
                yield p.service
