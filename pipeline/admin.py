"""The admin API (issue #9): scaffolding, filled in by the lifecycle work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config
from .http import Route

if TYPE_CHECKING:
    from ._graph import Pipeline

__all__ = ["AdminApi"]


class AdminApi:
    def __init__(self, config: Config) -> None:
        self.config = config

    def routes(self, pipe: Pipeline) -> list[Route]:
        return []
