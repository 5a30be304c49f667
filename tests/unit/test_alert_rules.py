"""deploy/prometheus: the alert rules load, each fires on synthetic series and stays silent
on healthy ones (promtool test rules), every runbook link has its section, and every
Grafana panel's expression is valid PromQL (promtool, through generated recording rules)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RUNBOOKS = ROOT / "docs" / "runbooks.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing (Debian: prometheus; scripts/setup-system.sh installs it)")
    return path


def _run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rules_load(promtool: str) -> None:
    proc = _run(promtool, "check", "rules", "alerts.yml")
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_each_alert_fires_and_stays_silent_as_its_cases_say(promtool: str) -> None:
    proc = _run(promtool, "test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    fires = {t["alert_rule_test"][0]["alertname"] for t in tests if t["alert_rule_test"][0]["exp_alerts"]}
    silent = {
        t["alert_rule_test"][0]["alertname"] for t in tests if not t["alert_rule_test"][0]["exp_alerts"]
    }
    assert fires == silent == alerts


def test_a_broken_threshold_fails_its_test(promtool: str, tmp_path: Path) -> None:
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    text = (
        (PROM / "alerts.yml")
        .read_text()
        .replace("bpf_ringbuf_usage_percent > 90", "bpf_ringbuf_usage_percent > 96")
    )
    (tmp_path / "alerts.yml").write_text(text)
    proc = _run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0 and "BpfpipeRingBufferHigh fires" in proc.stdout + proc.stderr


def test_generated_test_file_is_current() -> None:
    spec = importlib.util.spec_from_file_location("make_alerts_test", PROM / "make_alerts_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generate() == (PROM / "alerts_test.yml").read_text(), (
        "run deploy/prometheus/make_alerts_test.py"
    )


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_alert_has_annotations_and_a_runbook_section() -> None:
    anchors = _anchors(RUNBOOKS.read_text())
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbooks.md" and anchor in anchors, rule["alert"]


def test_every_dashboard_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    dashboard = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 20
    rules = [{"record": f"bpfpipe:dashboard_expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    proc = _run(promtool, "check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert proc.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in proc.stdout, (
        proc.stdout + proc.stderr
    )
