"""Errors meant for people: each renders as one line, and carries an exit code.

Exit codes (scripts rely on them): 1 runtime failure, 2 bad config or usage,
3 the machine cannot run BPF (privilege, headers, tracefs, verifier).
"""

from __future__ import annotations

__all__ = [
    "BpfUnavailableError",
    "BpfpipeError",
    "ConfigError",
    "SinkClosed",
    "StageLoadError",
    "StageStartError",
]


class BpfpipeError(Exception):
    """Base class: ``str(exc)`` is the one line the CLI prints."""

    exit_code = 1


class ConfigError(BpfpipeError):
    """Bad configuration; the message starts with the key path."""

    exit_code = 2

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class StageLoadError(ConfigError):
    """A stage cannot be imported, is not a stage, or its config is wrong."""

    def __init__(self, stage: str, problem: str) -> None:
        super().__init__(f"stage {stage!r}", problem)
        self.stage = stage


class StageStartError(BpfpipeError):
    """A stage raised before it said it was ready. Keeps the exit code of a
    :class:`BpfpipeError` cause (e.g. 3 when BPF is unavailable)."""

    def __init__(self, stage: str, problem: str, exit_code: int = 1) -> None:
        self.stage = stage
        self.exit_code = exit_code
        super().__init__(f"stage {stage!r} failed to start: {problem}")


class BpfUnavailableError(BpfpipeError):
    """This machine or user cannot load BPF programs; says what is missing and how to fix it."""

    exit_code = 3


class SinkClosed(Exception):
    """Raised by a sink's ``write`` when its output is gone for good (e.g. the
    reader of stdout exited). The runtime then stops the pipeline gracefully and
    records what can no longer be written as dropped (reason ``output closed``)."""
