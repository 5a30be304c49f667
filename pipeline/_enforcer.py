"""The periodic resource-limit enforcer: a thin trio shell over ``limits.ResourceGovernor``.

Every ``limits.enforce_interval_s`` it reads the process's resident memory and
the entry counts of the growing maps of every :class:`~pipeline.TrimmableMaps`
the sources published, applies the governor's actions (memory pressure on/off,
map trimming), logs each on transition and counts it (``counts``, for metrics).

It is a pipeline *helper*: ``build_pipeline`` composes it in
(``Pipeline(..., helpers=[enforcer.run])``); a graph built without it reads
nothing from ``/proc``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .config import LimitsConfig
from .limits import EvictMap, MemoryPressure, ResourceGovernor
from .ticks import sleep_to_next_tick

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = ["ResourceEnforcer", "read_rss_bytes"]

log = logging.getLogger("bpfpipe.limits")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class ResourceEnforcer:
    def __init__(self, limits: LimitsConfig, read_rss: Callable[[], int] = read_rss_bytes) -> None:
        self._pipeline: Pipeline | None = None
        self._read_rss = read_rss
        self.interval_s = limits.enforce_interval_s
        self.governor = ResourceGovernor(
            max_memory_bytes=limits.max_memory_mb * 1024 * 1024, max_map_entries=limits.max_map_entries
        )
        self.evicted_entries = 0

    def reconfigure(self, limits: LimitsConfig) -> None:
        """Take new limits (a live reload): from the next period on; a memory-pressure
        state already on stays on until the new limit releases it."""
        self.interval_s = limits.enforce_interval_s
        self.governor.max_memory_bytes = limits.max_memory_mb * 1024 * 1024
        self.governor.max_map_entries = limits.max_map_entries

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.governor.counts)

    def bind(self, pipeline: Pipeline) -> None:
        """Enforce on ``pipeline`` (``run`` does this; tests calling ``check`` directly too)."""
        self._pipeline = pipeline

    def check(self) -> None:
        """One enforcement period.

        A program whose maps cannot be read or trimmed is logged and skipped for this
        period: it must not leave the memory limit, or the other maps, unenforced."""
        if self._pipeline is None:
            raise RuntimeError("ResourceEnforcer.check() before bind(pipeline)")
        pressure = self._pipeline.pressure
        rss = self._read_rss()
        pressure.rss_bytes = rss
        programs = {p.name: p for p in self._pipeline.services.programs()}
        entries: dict[tuple[str, str], int] = {}
        for name, program in programs.items():
            try:
                counts = program.growing_maps()
            except Exception as exc:
                log.error("cannot read the maps of BPF program %r: %s: %s", name, type(exc).__name__, exc)
                continue
            entries.update(((name, map_name), count) for map_name, count in counts.items())
        for action in self.governor.evaluate(rss, entries):
            if isinstance(action, MemoryPressure):
                pressure.memory = action.on
                mib = action.rss_bytes / 2**20
                if action.on:
                    log.warning(
                        "memory pressure: draining ring buffers instead of waiting",
                        extra={"rss_mib": round(mib, 1), "limit_mib": action.limit_bytes // 2**20},
                    )
                else:
                    log.info("memory pressure over", extra={"rss_mib": round(mib, 1)})
            elif isinstance(action, EvictMap):
                try:
                    deleted = programs[action.program].evict_oldest(action.map_name, action.keep)
                except Exception as exc:
                    log.error(
                        "cannot trim map %r of BPF program %r: %s: %s",
                        action.map_name,
                        action.program,
                        type(exc).__name__,
                        exc,
                    )
                    continue
                self.evicted_entries += deleted
                log.warning(
                    "map over max_map_entries: evicted oldest entries",
                    extra={
                        "program": action.program,
                        "map": action.map_name,
                        "entries": action.entries,
                        "evicted": deleted,
                    },
                )

    async def run(
        self, pipeline: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.bind(pipeline)
        task_status.started()
        while True:
            try:
                self.check()
            except Exception as exc:  # a failed check must not take the pipeline down
                log.error("resource check failed: %s: %s", type(exc).__name__, exc)
            await sleep_to_next_tick(self.interval_s)
