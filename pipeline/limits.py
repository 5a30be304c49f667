"""Resource limits: the pure policy behind the periodic enforcer.

Rules
-----
* ``max_memory_mb`` — when the process's resident memory passes the limit, the
  pipeline enters *memory pressure*: sources with the ``drain_oldest`` policy
  stop waiting for downstream and drain their ring buffers instead, so memory
  stops growing while the kernel keeps writing fresh events. Pressure ends when
  memory falls below ``release_fraction`` of the limit (hysteresis, so it does
  not flap).
* ``max_map_entries`` — a BPF map that grows with the workload and holds more
  entries than the limit is trimmed to ``trim_fraction`` of it, oldest entries
  first (see ``LoadedProgram.evict_oldest`` for what "oldest" means per map).
* ``max_events_per_sec`` — handed to the adaptive sampler as its cap.

Every action is returned as a value; the caller logs transitions (not every
period) and counts them. No I/O here: the reading comes in as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["EvictMap", "MemoryPressure", "Pressure", "ResourceGovernor"]


@dataclass(slots=True)
class Pressure:
    """Shared, read by sources each loop: what the enforcer currently demands."""

    memory: bool = False
    rss_bytes: int = 0


@dataclass(frozen=True, slots=True)
class MemoryPressure:
    on: bool
    rss_bytes: int
    limit_bytes: int


@dataclass(frozen=True, slots=True)
class EvictMap:
    program: str
    map_name: str
    entries: int
    keep: int


Action = MemoryPressure | EvictMap


@dataclass
class ResourceGovernor:
    max_memory_bytes: int
    max_map_entries: int
    release_fraction: float = 0.9
    trim_fraction: float = 0.9
    memory_pressure: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def evaluate(self, rss_bytes: int, map_entries: Mapping[tuple[str, str], int]) -> list[Action]:
        """One enforcement period: the actions to take now (transitions only)."""
        actions: list[Action] = []
        if self.max_memory_bytes:
            if not self.memory_pressure and rss_bytes > self.max_memory_bytes:
                self.memory_pressure = True
                actions.append(MemoryPressure(True, rss_bytes, self.max_memory_bytes))
            elif self.memory_pressure and rss_bytes < self.release_fraction * self.max_memory_bytes:
                self.memory_pressure = False
                actions.append(MemoryPressure(False, rss_bytes, self.max_memory_bytes))
        if self.max_map_entries:
            keep = int(self.max_map_entries * self.trim_fraction)
            for (program, map_name), entries in sorted(map_entries.items()):
                if entries > self.max_map_entries:
                    actions.append(EvictMap(program, map_name, entries, keep))
        for action in actions:
            key = (
                type(action).__name__
                if not isinstance(action, MemoryPressure)
                else f"memory_pressure_{'on' if action.on else 'off'}"
            )
            self.counts[key] = self.counts.get(key, 0) + 1
        return actions
