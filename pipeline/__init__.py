"""bpfpipe's runtime: batches, bounded channels, the stage API, the graph, config.

The public surface is re-exported here; the private modules do the work.

The re-exports are lazy (PEP 562): ``import pipeline`` costs almost nothing, and a
name's module is imported on first use. The ``bpfpipe`` command relies on it: it
installs its signal handlers before the ~0.2 s of importing numpy, trio and the
rest, so a Ctrl-C at any moment is handled like any other. ``_EXPORTS`` and the
``TYPE_CHECKING`` imports say the same thing (for the runtime and for type
checkers); ``tests/unit/test_public_api.py`` checks that they agree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._batch import Batch as Batch
    from ._build import build_pipeline as build_pipeline
    from ._channel import BatchReceiver as BatchReceiver
    from ._channel import BatchSender as BatchSender
    from ._channel import EdgeStatistics as EdgeStatistics
    from ._channel import InflightBudget as InflightBudget
    from ._graph import ChainSwitch as ChainSwitch
    from ._graph import ChainSwitchError as ChainSwitchError
    from ._graph import Helper as Helper
    from ._graph import NodeSpec as NodeSpec
    from ._graph import Pipeline as Pipeline
    from ._graph import PipelineStatistics as PipelineStatistics
    from ._registry import decode_stage_config as decode_stage_config
    from ._registry import resolve as resolve_stage
    from ._services import HEARTBEAT_EVENT as HEARTBEAT_EVENT
    from ._services import HeartbeatSource as HeartbeatSource
    from ._services import ProgramHealth as ProgramHealth
    from ._services import SamplingController as SamplingController
    from ._services import SamplingGate as SamplingGate
    from ._services import TrimmableMaps as TrimmableMaps
    from ._stage import BatchSink as BatchSink
    from ._stage import BatchStage as BatchStage
    from ._stage import NoConfig as NoConfig
    from ._stage import Sink as Sink
    from ._stage import Source as Source
    from ._stage import Stage as Stage
    from ._stage import StageContext as StageContext
    from ._stage import StageStatistics as StageStatistics
    from ._stage import describe as describe
    from ._stage import per_event as per_event
    from .accounting import Ledger as Ledger
    from .accounting import Outcome as Outcome
    from .config import Config as Config
    from .config import load_config as load_config
    from .errors import BpfpipeError as BpfpipeError
    from .errors import ConfigError as ConfigError
    from .errors import SinkClosed as SinkClosed
    from .errors import StageLoadError as StageLoadError
    from .output import LineOutput as LineOutput
    from .output import appendable_problem as appendable_problem
    from .ticks import last_tick_by as last_tick_by
    from .ticks import next_tick as next_tick
    from .ticks import sleep_to_next_tick as sleep_to_next_tick
    from .timerfd import MonotonicTimer as MonotonicTimer

_EXPORTS: dict[str, tuple[str, str]] = {
    "Batch": ("_batch", "Batch"),
    "build_pipeline": ("_build", "build_pipeline"),
    "BatchReceiver": ("_channel", "BatchReceiver"),
    "BatchSender": ("_channel", "BatchSender"),
    "EdgeStatistics": ("_channel", "EdgeStatistics"),
    "InflightBudget": ("_channel", "InflightBudget"),
    "ChainSwitch": ("_graph", "ChainSwitch"),
    "ChainSwitchError": ("_graph", "ChainSwitchError"),
    "Helper": ("_graph", "Helper"),
    "NodeSpec": ("_graph", "NodeSpec"),
    "Pipeline": ("_graph", "Pipeline"),
    "PipelineStatistics": ("_graph", "PipelineStatistics"),
    "decode_stage_config": ("_registry", "decode_stage_config"),
    "resolve_stage": ("_registry", "resolve"),
    "HEARTBEAT_EVENT": ("_services", "HEARTBEAT_EVENT"),
    "HeartbeatSource": ("_services", "HeartbeatSource"),
    "ProgramHealth": ("_services", "ProgramHealth"),
    "SamplingController": ("_services", "SamplingController"),
    "SamplingGate": ("_services", "SamplingGate"),
    "TrimmableMaps": ("_services", "TrimmableMaps"),
    "BatchSink": ("_stage", "BatchSink"),
    "BatchStage": ("_stage", "BatchStage"),
    "NoConfig": ("_stage", "NoConfig"),
    "Sink": ("_stage", "Sink"),
    "Source": ("_stage", "Source"),
    "Stage": ("_stage", "Stage"),
    "StageContext": ("_stage", "StageContext"),
    "StageStatistics": ("_stage", "StageStatistics"),
    "describe": ("_stage", "describe"),
    "per_event": ("_stage", "per_event"),
    "Ledger": ("accounting", "Ledger"),
    "Outcome": ("accounting", "Outcome"),
    "Config": ("config", "Config"),
    "load_config": ("config", "load_config"),
    "BpfpipeError": ("errors", "BpfpipeError"),
    "ConfigError": ("errors", "ConfigError"),
    "SinkClosed": ("errors", "SinkClosed"),
    "StageLoadError": ("errors", "StageLoadError"),
    "LineOutput": ("output", "LineOutput"),
    "appendable_problem": ("output", "appendable_problem"),
    "last_tick_by": ("ticks", "last_tick_by"),
    "next_tick": ("ticks", "next_tick"),
    "sleep_to_next_tick": ("ticks", "sleep_to_next_tick"),
    "MonotonicTimer": ("timerfd", "MonotonicTimer"),
}
"""Public name -> (module, name in it)."""

__version__ = "0.1.0"

__all__ = [
    "HEARTBEAT_EVENT",
    "Batch",
    "BatchReceiver",
    "BatchSender",
    "BatchSink",
    "BatchStage",
    "BpfpipeError",
    "ChainSwitch",
    "ChainSwitchError",
    "Config",
    "ConfigError",
    "EdgeStatistics",
    "HeartbeatSource",
    "Helper",
    "InflightBudget",
    "Ledger",
    "LineOutput",
    "MonotonicTimer",
    "NoConfig",
    "NodeSpec",
    "Outcome",
    "Pipeline",
    "PipelineStatistics",
    "ProgramHealth",
    "SamplingController",
    "SamplingGate",
    "Sink",
    "SinkClosed",
    "Source",
    "Stage",
    "StageContext",
    "StageLoadError",
    "StageStatistics",
    "TrimmableMaps",
    "appendable_problem",
    "build_pipeline",
    "decode_stage_config",
    "describe",
    "last_tick_by",
    "load_config",
    "next_tick",
    "per_event",
    "resolve_stage",
    "sleep_to_next_tick",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
