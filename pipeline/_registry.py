"""Find stage classes by name and decode their configs.

``use`` resolves in this order: an import path ``package.module:Class``; an
entry point of the ``bpfpipe.stages`` group (built-ins are registered there
too, in our ``pyproject.toml``). Any failure is a :class:`StageLoadError` that
names the stage and the reason in one line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import msgspec

from ._graph import NodeSpec
from ._stage import Sink, Source, Stage
from .config import Config, NodeConfig, config_error_from
from .errors import StageLoadError

__all__ = ["ENTRY_POINT_GROUP", "available_stages", "build_specs", "resolve"]

ENTRY_POINT_GROUP = "bpfpipe.stages"

_KIND_BASE: dict[str, type[Any]] = {"source": Source, "stage": Stage, "sink": Sink}


def available_stages() -> dict[str, str]:
    """Entry-point names and what they point to (for ``--help`` and errors)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve(use: str, *, stage: str) -> type[Any]:
    if ":" in use:
        module_name, _, attr = use.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise StageLoadError(stage, f"cannot import {module_name!r}: {exc}") from None
        except Exception as exc:
            raise StageLoadError(
                stage, f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
            ) from None
        try:
            obj: Any = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise StageLoadError(stage, f"module {module_name!r} has no attribute {attr!r}") from None
        return obj  # type: ignore[no-any-return]
    matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == use]
    if not matches:
        known = ", ".join(sorted(available_stages())) or "none installed"
        raise StageLoadError(
            stage, f"no stage named {use!r} (known: {known}; or give an import path 'pkg.mod:Class')"
        )
    try:
        return matches[0].load()  # type: ignore[no-any-return]
    except Exception as exc:
        raise StageLoadError(
            stage, f"entry point {use!r} ({matches[0].value}) failed to load: {type(exc).__name__}: {exc}"
        ) from None


def _node_spec(node: NodeConfig, kind: str, path: str) -> NodeSpec:
    name = node.name or node.use
    cls = resolve(node.use, stage=name)
    base = _KIND_BASE[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        what = getattr(cls, "kind", None) or type(cls).__name__
        raise StageLoadError(
            name, f"{node.use!r} is a {what}, not a {kind} ({base.__module__}.{base.__name__})"
        )
    try:
        config = msgspec.convert(node.config, cls.Config, strict=True)
    except msgspec.ValidationError as exc:
        err = config_error_from(exc, node.config, cls.Config, prefix=f"{path}.config")
        raise StageLoadError(name, str(err)) from None
    return NodeSpec(name, cls, config)


def build_specs(config: Config) -> tuple[list[NodeSpec], list[int]]:
    """The chain's node specs and the capacity of each edge (into nodes 1..n)."""
    source = _node_spec(config.source, "source", "source")
    companions = [
        NodeConfig(use=use, name=f"{source.name}.{suffix}")
        for suffix, use in getattr(source.factory, "follow_with", ())
    ]
    specs = [source]
    specs += [_node_spec(node, "stage", f"source.follow_with[{i}]") for i, node in enumerate(companions)]
    specs += [_node_spec(node, "stage", f"stages[{i}]") for i, node in enumerate(config.stages)]
    specs.append(_node_spec(config.sink, "sink", "sink"))
    nodes = [config.source, *companions, *config.stages, config.sink]
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise StageLoadError(name, "two stages have this name; give each a unique 'name'")
    default = config.channels.capacity
    capacities = [node.capacity or default for node in nodes[1:]]
    return specs, capacities
