"""Every health check and every alert has its runbook section."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.runbooks import CHECK_RUNBOOKS, runbook_section

ROOT = Path(__file__).resolve().parents[2]


def test_docs_runbooks_is_the_shipped_file() -> None:
    assert (ROOT / "docs" / "runbooks.md").resolve() == (ROOT / "pipeline" / "runbooks.md").resolve()


def test_each_alert_and_check_finds_its_section() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for alert in (r["alert"] for g in rules["groups"] for r in g["rules"]):
        section = runbook_section(alert)
        assert section is not None and section.startswith(f"## {alert}\n"), alert
        for part in ("**Means.**", "**Confirm.**", "**Resolve.**", "**Verify.**"):
            assert part in section, (alert, part)
        assert "\n## " not in section  # one section, not the rest of the file
    for check, alert in CHECK_RUNBOOKS.items():
        assert runbook_section(check) == runbook_section(alert), check


def test_unknown_name_has_no_section() -> None:
    assert runbook_section("NoSuchAlert") is None
