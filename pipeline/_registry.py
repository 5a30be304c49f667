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

from .config import config_error_from
from .errors import StageLoadError

__all__ = ["ENTRY_POINT_GROUP", "available_stages", "decode_stage_config", "resolve"]

ENTRY_POINT_GROUP = "bpfpipe.stages"


def available_stages() -> dict[str, str]:
    """Entry-point names and what they point to (for ``--help`` and errors)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve(use: str, *, stage: str) -> type[Any]:
    """The class ``use`` names (see the module docstring); ``stage`` names the stage
    asking, for the error message."""
    if ":" in use:
        module_name, _, attr = use.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise StageLoadError(stage, f"cannot import {module_name!r}: {exc}") from None
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # A plug-in that calls sys.exit() or raises KeyboardInterrupt at import is a
            # failing plug-in like any other, not the end of the process.
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise StageLoadError(stage, f"importing {module_name!r} raised {what}") from None
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
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        raise StageLoadError(
            stage, f"entry point {use!r} ({matches[0].value}) failed to load: {type(exc).__name__}: {exc}"
        ) from None


def decode_stage_config(cls: type[Any], raw: Any, *, stage: str, path: str) -> Any:
    """``cls.Config`` from ``raw``: None (the defaults), a table (decoded strictly;
    errors name the key as ``<path>.<key>``), or an already decoded ``Config``."""
    if raw is None:
        return cls.Config()
    if isinstance(raw, cls.Config):
        return raw
    if not isinstance(raw, dict):
        raise StageLoadError(stage, f"{path}: expected a table, got {type(raw).__name__}")
    try:
        return msgspec.convert(raw, cls.Config, strict=True)
    except msgspec.ValidationError as exc:
        raise StageLoadError(stage, str(config_error_from(exc, raw, cls.Config, prefix=path))) from None
