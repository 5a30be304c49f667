"""``/health/live`` and ``/health/ready`` of a ``bpfpipe run`` started as a user starts it.

Ready (200) once the first heartbeat has made it through; 503 when a critical check
fails (the XDP program detached from outside, on a veth into a namespace this test
makes) and at once when draining starts (SIGTERM with a slow sink, so the drain takes
seconds). Servers listen on loopback only, on ports the kernel picked free.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from _cli import free_port, write_module
from _running_agent import RunningAgent
from integration._netns import interface_exists, netns_exists, veth_netns


def by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in body["details"]}


@pytest.mark.bpf
def test_ready_until_the_xdp_program_is_detached_from_outside(tmp_path: Path, unique_name: str) -> None:
    with veth_netns(unique_name) as net:
        config = tmp_path / "c.toml"
        config.write_text(
            'health_bind = "127.0.0.1"\n'
            '[source]\nuse = "xdp_firewall"\n'
            f'config = {{ options = {{ interface = "{net.host_if}", mode = "skb" }} }}\n'
            '[sink]\nuse = "null"\n'
            "[health]\nheartbeat_interval_s = 0.5\nheartbeat_deadline_s = 10\n"
        )
        agent = RunningAgent("--config", str(config), health_port=free_port())
        try:
            body = agent.wait_ready()
            checks = by_name(body)
            assert body["healthy"] is True
            assert checks["programs_loaded"]["message"] == "xdp_firewall: loaded and attached"
            assert checks["maps_accessible"]["healthy"] is True
            assert "round trip" in checks["heartbeat"]["message"]  # the XDP program's heartbeat
            status, live = agent.get_health("/health/live")
            assert status == 200 and live["alive"] is True

            subprocess.run(["ip", "link", "set", "dev", net.host_if, "xdpgeneric", "off"], check=True)
            status, body = agent.get_health("/health/ready")
            assert status == 503, body
            assert body["healthy"] is False
            loaded = by_name(body)["programs_loaded"]
            assert loaded["healthy"] is False and loaded["critical"] is True
            assert f"is no longer attached to {net.host_if} (now: none)" in loaded["message"], loaded
            assert by_name(body)["pipeline"]["healthy"] is True  # the rest still runs

            assert agent.stop() == 0, agent.stderr
            assert "Traceback" not in agent.stderr
        finally:
            agent.kill()
            for word in ("xdpgeneric", "xdpdrv"):
                subprocess.run(["ip", "link", "set", "dev", net.host_if, word, "off"], capture_output=True)
    assert not interface_exists(net.host_if) and not netns_exists(net.netns)


SLOW_SINK = """
    import trio
    from pipeline import Batch, BatchSink


    class SlowSink(BatchSink):
        async def write(self, batch: Batch) -> None:
            await trio.sleep(0.5)
"""


def test_not_ready_at_once_when_draining_starts(tmp_path: Path) -> None:
    write_module(tmp_path, "slowsink", SLOW_SINK)
    config = tmp_path / "c.toml"
    config.write_text(
        'health_bind = "127.0.0.1"\n'
        '[source]\nuse = "synthetic"\nconfig = { rate_per_s = 400, batch_size = 20 }\n'
        '[sink]\nuse = "slowsink:SlowSink"\n'
        "[channels]\ncapacity = 8\n"
        "[health]\nheartbeat_interval_s = 0.5\n"
    )
    agent = RunningAgent("--config", str(config), env={"PYTHONPATH": str(tmp_path)}, health_port=free_port())
    try:
        body = agent.wait_ready()
        assert (
            by_name(body)["programs_loaded"]["message"] == "not applicable: the source loads no BPF program"
        )
        agent.proc.send_signal(signal.SIGTERM)
        status, body = agent.get_health("/health/ready")
        draining_seen_while_running = agent.proc.poll() is None
        assert status == 503, body
        assert by_name(body)["pipeline"] == {
            "name": "pipeline",
            "healthy": False,
            "critical": True,
            "message": "draining: a stop was requested",
        }
        assert draining_seen_while_running  # answered while draining, not after
        while agent.proc.poll() is None:  # never ready again while it drains
            try:
                status, body = agent.get_health("/health/ready")
            except (urllib.error.URLError, ConnectionError):
                break  # the server is gone: the drain has finished
            assert status == 503, body
            time.sleep(0.1)
        assert agent.proc.wait(timeout=60) == 0, agent.stderr  # one SIGTERM: a second would abort
        agent.stop()
        finished = [line for line in agent.lines if 'msg="pipeline finished"' in line]
        assert len(finished) == 1 and "outcome_heartbeat=" in finished[0], agent.stderr
    finally:
        agent.kill()
