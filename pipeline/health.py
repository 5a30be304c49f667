"""Health checks and the end-to-end heartbeat (issue #8): scaffolding, filled in by the health work."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .config import Config
from .http import Route

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = ["HealthMonitor"]


class HealthMonitor:
    def __init__(self, config: Config) -> None:
        self.config = config

    def routes(self, pipe: Pipeline) -> list[Route]:
        return []

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
