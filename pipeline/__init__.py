"""bpfpipe's runtime: batches, bounded channels, the stage API, the graph, config.

The public surface is re-exported here; the private modules do the work.
"""

from ._batch import Batch as Batch
from ._build import build_pipeline as build_pipeline
from ._channel import BatchReceiver as BatchReceiver
from ._channel import BatchSender as BatchSender
from ._channel import EdgeStatistics as EdgeStatistics
from ._channel import InflightBudget as InflightBudget
from ._graph import Helper as Helper
from ._graph import NodeSpec as NodeSpec
from ._graph import Pipeline as Pipeline
from ._graph import PipelineStatistics as PipelineStatistics
from ._registry import decode_stage_config as decode_stage_config
from ._registry import resolve as resolve_stage
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

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchReceiver",
    "BatchSender",
    "BatchSink",
    "BatchStage",
    "BpfpipeError",
    "Config",
    "ConfigError",
    "EdgeStatistics",
    "Helper",
    "InflightBudget",
    "Ledger",
    "LineOutput",
    "NoConfig",
    "NodeSpec",
    "Outcome",
    "Pipeline",
    "PipelineStatistics",
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
    "load_config",
    "per_event",
    "resolve_stage",
]
