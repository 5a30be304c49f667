"""Services stages offer each other, typed: what a source publishes, who gets it.

A stage calls ``ctx.publish(obj)`` once it is running; the runtime files ``obj``
under every service protocol it implements (structural, checked once at
publish time, never per batch) and, when every node has started, wires them:

* a :class:`SamplingGate` (a BPF program's in-kernel gate) goes to every
  :class:`SamplingController` (the adaptive sampler) *downstream* of the stage
  that published it — so with several sources, each sampler controls the gates
  of the sources that feed it;
* a :class:`TrimmableMaps` (a BPF program with growing maps) goes to the
  resource enforcer, which trims it past ``limits.max_map_entries``.

Publishing something that implements none of these is an error: a typo in a
method name should fail at start, not silently leave a gate unwired.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["Published", "SamplingController", "SamplingGate", "Services", "TrimmableMaps"]


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


SERVICE_PROTOCOLS: tuple[type, ...] = (SamplingGate, TrimmableMaps)


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

    def publish(self, node: int, service: object) -> None:
        filed = False
        if isinstance(service, SamplingGate):
            self.sampling_gates.append(Published(node, service))
            filed = True
        if isinstance(service, TrimmableMaps):
            self.trimmable_maps.append(Published(node, service))
            filed = True
        if not filed:
            names = ", ".join(p.__name__ for p in SERVICE_PROTOCOLS)
            raise TypeError(f"{type(service).__name__} implements no service protocol ({names})")

    def gates(self) -> Iterator[SamplingGate]:
        for p in self.sampling_gates:
            assert isinstance(p.service, SamplingGate)
            yield p.service

    def programs(self) -> Iterator[TrimmableMaps]:
        """Trimmable programs that are still loaded."""
        for p in self.trimmable_maps:
            assert isinstance(p.service, TrimmableMaps)
            if not p.service.closed:
                yield p.service
