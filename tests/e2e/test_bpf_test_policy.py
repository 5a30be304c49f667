"""The BPF test policy itself: without the privilege to load BPF, a BPF test skips
with the reason locally and *fails* under CI=true — CI never passes by skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _privilege import unprivileged

ROOT = Path(__file__).resolve().parents[2]
BPF_TESTS = "tests/integration/test_loader.py"


def run_unprivileged_pytest(ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [*unprivileged(), sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", BPF_TESTS],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("ci", [True, False], ids=["CI=true", "local"])
def test_unavailable_bpf_fails_in_ci_and_skips_locally(ci: bool) -> None:
    proc = run_unprivileged_pytest(ci)
    if ci:
        assert proc.returncode != 0, proc.stdout
        assert "BPF test cannot run in CI: BPF unavailable: not running as root" in proc.stdout
        assert "skipped" not in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout
        assert "BPF test skipped outside CI: BPF unavailable: not running as root" in proc.stdout
        assert "skipped" in proc.stdout
