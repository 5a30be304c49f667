"""Tests that need a program ``make setup`` installs (Prometheus, promtool, bpftool,
nats-server) or root: without it they skip, saying what is missing — except under
``CI=true``, where they fail: CI must never pass by skipping them."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["require", "require_tools"]


def require(ok: bool, missing: str) -> None:
    """Go on if ``ok``; else fail under CI=true, skip elsewhere, saying ``missing``."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing} (CI must run this test, not skip it)", pytrace=False)
    pytest.skip(f"{missing} (make setup installs what tests need; under CI=true this fails)")


def require_tools(*tools: str) -> None:
    """Every one of ``tools`` (a name on PATH or an absolute path) must be installed."""
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} is not installed")
