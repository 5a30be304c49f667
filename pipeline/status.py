"""Read-only status for ``bpfpipe diag`` / ``top`` and the admin tap (issue #8): scaffolding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config
from .http import Route

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = ["StatusApi"]


class StatusApi:
    def __init__(self, config: Config) -> None:
        self.config = config

    def routes(self, pipe: Pipeline) -> list[Route]:
        return []

    def admin_routes(self, pipe: Pipeline) -> list[Route]:
        return []
