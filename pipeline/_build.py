"""Config → runnable graph: resolve every node, decode and resolve its config, compose helpers.

Everything that can fail on a bad config fails here, before anything starts:
``bpfpipe check`` runs exactly this and prints the configs it resolved.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._enforcer import ResourceEnforcer
from ._graph import NodeSpec, Pipeline
from ._registry import decode_stage_config, resolve
from ._stage import Sink, Source, Stage, describe
from .config import Config, NodeConfig
from .errors import ConfigError, StageLoadError

__all__ = ["build_pipeline", "build_specs", "resolved_config"]

_KIND_BASE: dict[str, type[Any]] = {"source": Source, "stage": Stage, "sink": Sink}


def _node_spec(node: NodeConfig, kind: str, path: str, settings: Config) -> NodeSpec:
    name = node.name or node.use
    cls = resolve(node.use, stage=name)
    base = _KIND_BASE[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        what = getattr(cls, "kind", None) or type(cls).__name__
        raise StageLoadError(name, f"{node.use!r} is a {what}, not a {kind} ({describe(base)})")
    config = decode_stage_config(cls, node.config, stage=name, path=f"{path}.config")
    try:
        config = cls.resolve_config(config, settings)
    except ConfigError as exc:  # paths are relative to the stage's config table
        raise StageLoadError(name, f"{path}.config.{exc}" if exc.path else f"{path}.config: {exc}") from None
    except ValueError as exc:
        raise StageLoadError(name, f"{path}.config: {exc}") from None
    return NodeSpec(name, cls, config)


def build_specs(config: Config) -> tuple[list[NodeSpec], list[int]]:
    """The chain's node specs (configs resolved) and the capacity of each edge (into nodes 1..n)."""
    source = _node_spec(config.source, "source", "source", config)
    companions = [
        NodeConfig(use=use, name=f"{source.name}.{suffix}")
        for suffix, use in getattr(source.factory, "follow_with", ())
    ]
    specs = [source]
    specs += [
        _node_spec(node, "stage", f"source.follow_with[{i}]", config) for i, node in enumerate(companions)
    ]
    specs += [_node_spec(node, "stage", f"stages[{i}]", config) for i, node in enumerate(config.stages)]
    specs.append(_node_spec(config.sink, "sink", "sink", config))
    nodes = [config.source, *companions, *config.stages, config.sink]
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise StageLoadError(name, "two stages have this name; give each a unique 'name'")
    default = config.channels.capacity
    capacities = [node.capacity or default for node in nodes[1:]]
    return specs, capacities


def resolved_config(config: Config, specs: list[NodeSpec]) -> Config:
    """``config`` with each node's ``config`` table replaced by the resolved config its
    stage will run with (every field, defaults included)."""

    def table(spec: NodeSpec) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(spec.config)
        return out

    by_name = {spec.name: spec for spec in specs}

    def node(n: NodeConfig) -> NodeConfig:
        spec = by_name[n.name or n.use]
        return msgspec.structs.replace(n, config=table(spec))

    return msgspec.structs.replace(
        config,
        source=node(config.source),
        stages=[node(n) for n in config.stages],
        sink=node(config.sink),
    )


def build_pipeline(config: Config) -> Pipeline:
    """Resolve every stage, decode its config and wire the chain, with the helpers a
    running agent needs (the resource enforcer). Raises ``StageLoadError``."""
    specs, capacities = build_specs(config)
    enforcer = ResourceEnforcer(config.limits)
    return Pipeline(specs, capacities, settings=config, helpers=[enforcer.run])
