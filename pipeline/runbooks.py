"""The runbooks (``docs/runbooks.md``, shipped as ``pipeline/runbooks.md``): one section
per alert, found by the alert's name or by a health check's name, for ``bpfpipe diag``."""

from __future__ import annotations

from importlib import resources

__all__ = ["CHECK_RUNBOOKS", "runbook_section"]

CHECK_RUNBOOKS = {
    "pipeline": "BpfpipeNotReady",
    "programs_loaded": "BpfpipeProgramNotLoaded",
    "maps_accessible": "BpfpipeNotReady",
    "ringbuf_usage": "BpfpipeRingBufferHigh",
    "event_processing": "BpfpipeHeartbeatLate",
    "heartbeat": "BpfpipeHeartbeatLate",
}
"""The runbook section for each ``/health/ready`` check (pipeline/health.py's names)."""


def runbook_section(name: str) -> str | None:
    """The section (its heading and text) for alert ``name`` or health check ``name``;
    None if there is none."""
    title = CHECK_RUNBOOKS.get(name, name)
    text = resources.files("pipeline").joinpath("runbooks.md").read_text()
    lines = text.splitlines()
    try:
        start = lines.index(f"## {title}")
    except ValueError:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip() + "\n"
