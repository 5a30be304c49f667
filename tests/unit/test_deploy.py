"""deploy/: the systemd unit verifies, the Kubernetes manifests validate offline against a
stated Kubernetes version, and the settings that must agree with the agent's config do."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import decode_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"
MANIFESTS = ["namespace.yaml", "daemonset.yaml", "service.yaml", "configmap.yaml"]
BPFPIPE = Path(sys.executable).with_name("bpfpipe")


def _unit(text: str | None = None) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (text or (DEPLOY / "bpfpipe.service").read_text()).splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # The unit names /usr/bin/bpfpipe, where the package installs it; here it lives in
    # the venv, so the test points the copy there (the one path it changes).
    assert "ExecStart=/usr/bin/bpfpipe run" in unit_text
    unit = tmp_path / "bpfpipe.service"
    unit.write_text(unit_text.replace("/usr/bin/bpfpipe", str(BPFPIPE)))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian: systemd); the unit cannot be verified")


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    proc = _verify((DEPLOY / "bpfpipe.service").read_text(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # unknown keys are warnings: none allowed


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_verify_catches_a_typo(tmp_path: Path) -> None:
    text = (DEPLOY / "bpfpipe.service").read_text().replace("WatchdogSec=", "WatchdogSecs=")
    proc = _verify(text, tmp_path)
    assert "Unknown key" in proc.stderr and "WatchdogSecs" in proc.stderr


def test_systemd_unit_settings_agree_with_the_agent() -> None:
    unit = _unit()
    config = decode_config(tomllib.loads((DEPLOY / "bpfpipe.toml").read_text()))
    assert unit["Type"] == "notify" and unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert set(unit["CapabilityBoundingSet"].split()) == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}
    assert _seconds(unit["TimeoutStopSec"]) > config.shutdown.drain_timeout_s
    assert _megabytes(unit["MemoryMax"]) >= config.limits.max_memory_mb + 256
    assert set(unit["RestartPreventExitStatus"].split()) == {"2", "3"}  # config, BPF unavailable
    assert config.sink.config["path"].startswith(unit["ReadWritePaths"])


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s?", text)
    assert match, text
    return float(match[1])


def _megabytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([MG])i?", text)
    assert match, text
    return int(match[1]) * (1024 if match[2] == "G" else 1)


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    validate = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run(
        [str(validate), "-k", KUBERNETES_VERSION, "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifest_validates_offline(name: str) -> None:
    proc = _validate(DEPLOY / "kubernetes" / name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


def test_kubernetes_validation_catches_a_misspelled_field(tmp_path: Path) -> None:
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((DEPLOY / "kubernetes" / "daemonset.yaml").read_text().replace("hostPID:", "hostPid:"))
    proc = _validate(bad)
    assert proc.returncode != 0 and "hostPid" in proc.stdout + proc.stderr


def test_daemonset_settings_agree_with_the_agent() -> None:
    config = decode_config(tomllib.loads((DEPLOY / "bpfpipe.toml").read_text()))
    spec = yaml.safe_load((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["hostPID"] is True
    assert spec["terminationGracePeriodSeconds"] > config.shutdown.drain_timeout_s
    assert _megabytes(container["resources"]["limits"]["memory"]) >= config.limits.max_memory_mb + 256
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": config.metrics_port, "health": config.health_check_port}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for host_path in ("/sys/kernel/tracing", "/lib/modules", "/usr/src", "/etc/bpfpipe"):
        assert mounts[host_path].get("readOnly") is True, host_path
    assert "subPath" not in mounts["/etc/bpfpipe"]  # a subPath mount never sees ConfigMap updates


def test_configmap_holds_the_sample_config() -> None:
    configmap = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    assert configmap["data"]["bpfpipe.toml"] == (DEPLOY / "bpfpipe.toml").read_text()
