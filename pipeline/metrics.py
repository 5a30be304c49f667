"""Prometheus metrics (issue #8): scaffolding, filled in by the metrics work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from .config import Config
from .http import Route

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = ["MetricsExporter"]


class MetricsExporter:
    def __init__(self, config: Config, *, enforcer: Any = None) -> None:
        self.config = config
        self.enforcer = enforcer

    def routes(self, pipe: Pipeline) -> list[Route]:
        return []

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
