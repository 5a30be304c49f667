"""Config → running graph."""

from __future__ import annotations

from ._graph import Pipeline
from ._registry import build_specs
from .config import Config


def build_pipeline(config: Config) -> Pipeline:
    """Resolve every stage, decode its config and wire the chain (raises StageLoadError)."""
    specs, capacities = build_specs(config)
    return Pipeline(
        specs,
        capacities,
        max_inflight_events=config.limits.max_inflight_events,
        max_inflight_bytes=config.limits.max_inflight_bytes,
        settings=config,
    )
