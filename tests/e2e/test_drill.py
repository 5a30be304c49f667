"""The incident drill (lab 20.2): a slow sink fills the ring buffer, the alert fires in a
real Prometheus evaluating deploy/prometheus/alerts.yml, ``bpfpipe diag`` names the
failing check and prints its runbook section, ``bpfpipe capacity --from-agent`` measures
the live agent; the sink recovers and the alert clears.

The agent reads exec events (a thread here runs ``/bin/true`` a few hundred times a
second) into a 16 KiB ring with ``overflow = "block"`` (the seed's behaviour: a reader
that cannot send waits, the ring fills, the kernel loses new events on reserve; the
default ``drain_oldest`` would instead keep the ring under 90 % by draining, and the
events-lost alert would be the one to fire); its sink is a plug-in that sleeps on
every batch while a flag file exists. Prometheus (Debian's, started on loopback by the test, stopped
after) scrapes the agent every second and evaluates the shipped rules every second;
``BpfpipeRingBufferHigh`` has ``for: 1m``, so the drill takes about two minutes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from _cli import BPFPIPE, CLEAN_ENV, free_port, write_module
from _prometheus import Prometheus, require_prometheus
from _running_agent import RunningAgent, wait_http

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

SLOW_SINK = """
import os, time
import trio
from pipeline import BatchSink

class FlagSlowSink(BatchSink):
    '''Sleeps 0.5 s per batch while the file in $DRILL_FLAG exists.'''

    async def write(self, batch):
        if os.path.exists(os.environ["DRILL_FLAG"]):
            await trio.sleep(0.5)
"""


def _execs(stop: threading.Event) -> None:
    while not stop.is_set():
        for _ in range(20):
            subprocess.run(["/bin/true"], check=False)
        time.sleep(0.01)


def _alert_state(prom: Prometheus, name: str) -> str:
    alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
    states = [a["state"] for a in alerts if a["labels"].get("alertname") == name]
    return states[0] if states else "inactive"


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_ring_buffer_incident_drill(tmp_path: Path) -> None:
    require_prometheus()
    write_module(tmp_path, "drill_sink", SLOW_SINK)
    flag = tmp_path / "slow"
    flag.touch()
    metrics, health = free_port(), free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        'metrics_bind = "127.0.0.1"\nhealth_bind = "127.0.0.1"\n'
        '[source]\nuse = "exec"\nconfig = { ring_buffer_size = 16384, overflow = "block" }\n'
        '[sink]\nuse = "drill_sink:FlagSlowSink"\n'
        "[channels]\ncapacity = 2\n"
    )
    env: dict[str, str | None] = {
        "METRICS_PORT": str(metrics),
        "HEALTH_CHECK_PORT": str(health),
        "PYTHONPATH": str(tmp_path),
        "DRILL_FLAG": str(flag),
    }
    stop = threading.Event()
    load = threading.Thread(target=_execs, args=(stop,), daemon=True)
    agent = RunningAgent("--config", str(config), env=env)
    prom = Prometheus(tmp_path, metrics, rule_files=[ALERTS])
    try:
        agent.wait_for('msg="pipeline started"', timeout=120)
        wait_http(health, "/health/live")
        load.start()
        _wait(lambda: _alert_state(prom, "BpfpipeRingBufferHigh") == "firing", 150, "the ring alert to fire")

        diag = subprocess.run(
            [*BPFPIPE, "diag", "--port", str(health)],
            capture_output=True,
            text=True,
            timeout=60,
            env=CLEAN_ENV,
        )
        assert "ringbuf_usage" in diag.stdout and "FAILED" in diag.stdout, diag.stdout + diag.stderr
        assert "## BpfpipeRingBufferHigh" in diag.stdout and "**Resolve.**" in diag.stdout, diag.stdout

        capacity = subprocess.run(
            [*BPFPIPE, "capacity", "--from-agent", f"http://127.0.0.1:{metrics}", "--sample-s", "3"],
            capture_output=True,
            text=True,
            timeout=60,
            env=CLEAN_ENV,
        )
        assert capacity.returncode == 0, capacity.stderr
        assert "# measured http://127.0.0.1" in capacity.stdout and "ring_buffer_size = " in capacity.stdout

        flag.unlink()  # the sink recovers
        _wait(
            lambda: _alert_state(prom, "BpfpipeRingBufferHigh") == "inactive", 60, "the ring alert to clear"
        )
    finally:
        stop.set()
        if load.is_alive():
            load.join()
        prom.stop()
        code = agent.stop()
    assert code == 0, agent.stderr
