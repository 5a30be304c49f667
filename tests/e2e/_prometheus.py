"""A real Prometheus for the e2e tests: Debian's ``prometheus`` on a free loopback port,
a temporary config and TSDB directory, 1 s scrape and rule-evaluation intervals; the
test that starts one stops it (``stop()`` in a ``finally``)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _cli import free_port
from _tools import require_tools

PROMETHEUS, PROMTOOL = "/usr/bin/prometheus", "/usr/bin/promtool"


def require_prometheus() -> None:
    """Fail under CI (make setup installs it), skip elsewhere, when Prometheus is missing."""
    require_tools(PROMETHEUS, PROMTOOL)


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
        except (OSError, ValueError, KeyError, IndexError):
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Prometheus:
    """Scrapes ``127.0.0.1:target_port`` as job ``bpfpipe`` every second and evaluates
    ``rule_files`` (e.g. deploy/prometheus/alerts.yml) every second."""

    def __init__(self, tmp_path: Path, target_port: int, *, rule_files: Sequence[Path] = ()) -> None:
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        rules = "".join(f"  - {path}\n" for path in rule_files)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n  - job_name: bpfpipe\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = (tmp_path / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: http_get(f"{self.url}/-/ready") is not None, 30, "prometheus to be ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        """The JSON of ``GET path`` on Prometheus's HTTP API."""
        return json.loads(http_get(f"{self.url}{path}"))

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = json.loads(http_get(url))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, expr: str) -> tuple[float, float] | None:
        """(sample time, value) of a one-series instant query, or None if there is none yet."""
        result = self.query(expr)
        if len(result) != 1:
            return None
        at, value = result[0]["value"]
        return float(at), float(value)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
