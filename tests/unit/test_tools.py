"""The test suite's own rule: a missing tool skips a test outside CI and fails it under CI=true."""

from __future__ import annotations

import pytest
from _tools import require, require_tools


def test_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xyz is not installed"):
        require_tools("no-such-tool-xyz")


def test_missing_tool_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-xyz is not installed"):
        require_tools("no-such-tool-xyz")


def test_present_tools_and_true_conditions_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require_tools("sh")
    require(True, "never said")
