"""A real Prometheus scrapes ``bpfpipe run`` (XDP firewall on a veth into a private netns).

The test starts Debian's ``prometheus`` on loopback (temporary config and TSDB
directory, 1 s scrape interval) and stops it; the agent serves ``/metrics`` on a
free loopback port. Traffic goes only into the namespace this test made; one of
its two source addresses is in the source's ``blocked_ips``. The kernel's own
counts are read with ``bpftool map lookup`` of ``bpfpipe_stats`` (per CPU,
summed), independently of the agent, and Prometheus's answers (``/api/v1/query``)
must equal them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _cli import free_port
from _prometheus import PROMTOOL, Prometheus, http_get, require_prometheus, wait_for
from _running_agent import RunningAgent
from _tools import require_tools
from integration._netns import VethNetns, interface_exists, netns_exists, veth_netns

pytestmark = pytest.mark.bpf

BPFTOOL = "bpftool"
STAT_PROCESSED, STAT_DROPPED = 4, 5  # enum bpfpipe_stat in bpf/bpfpipe_types.h
PROMTOOL_SEED_FINDING = "bpf_processing_latency_ns metric names should not contain abbreviated units"
ALLOWED_PACKETS, BLOCKED_PACKETS = 30, 20


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


# -- the agent's program, seen from outside with bpftool ---------------------------------------


def program_maps(interface: str) -> dict[str, int]:
    """Map name -> id of the XDP program attached to ``interface``."""
    link = json.loads(run(["ip", "-j", "link", "show", "dev", interface]))[0]
    prog_id = int(link["xdp"]["prog"]["id"])
    prog = json.loads(run([BPFTOOL, "-j", "prog", "show", "id", str(prog_id)]))
    maps = {}
    for map_id in prog["map_ids"]:
        info = json.loads(run([BPFTOOL, "-j", "map", "show", "id", str(map_id)]))
        maps[info["name"]] = map_id
    return maps


def kernel_stat(map_id: int, index: int) -> int:
    """One row of the per-CPU ``bpfpipe_stats`` array, summed over CPUs."""
    key = [f"{b:02x}" for b in index.to_bytes(4, "little")]
    entry = json.loads(run([BPFTOOL, "-j", "map", "lookup", "id", str(map_id), "key", "hex", *key]))
    total = 0
    for per_cpu in entry["values"]:
        raw = per_cpu["value"]
        total += (
            int(raw) if isinstance(raw, int) else int.from_bytes(bytes(int(b, 16) for b in raw), "little")
        )
    return total


def write_config(tmp_path: Path, net: VethNetns, blocked: str) -> Path:
    config = tmp_path / "agent.toml"
    options = f'options = {{ interface = "{net.host_if}", mode = "skb" }}'
    config.write_text(
        'metrics_bind = "127.0.0.1"\n'
        '[source]\nuse = "xdp_firewall"\n'
        f'config = {{ {options}, blocked_ips = ["{blocked}"] }}\n'
        '[sink]\nuse = "null"\n'
    )
    return config


def test_prometheus_scrapes_the_kernel_counts(tmp_path: Path, unique_name: str) -> None:
    require_prometheus()
    require_tools(BPFTOOL)
    metrics_port = free_port()
    with veth_netns(unique_name) as net:
        allowed_src, blocked_src = net.peer_addrs
        agent = RunningAgent(
            "--config", str(write_config(tmp_path, net, blocked_src)), metrics_port=metrics_port
        )
        prometheus: Prometheus | None = None
        try:
            agent.wait_started()
            maps = program_maps(net.host_if)
            prometheus = Prometheus(tmp_path, metrics_port)
            wait_for(lambda: prometheus.scalar('up{job="bpfpipe"} == 1'), 30, "the first scrape")

            net.send_udp(allowed_src, 9, ALLOWED_PACKETS)  # port 9 (discard): nobody listens; XDP sees them
            net.send_udp(blocked_src, 9, BLOCKED_PACKETS)

            def settled() -> tuple[int, int] | None:
                """The kernel's counts, once Prometheus has scraped them after they stopped moving."""
                stats = maps["bpfpipe_stats"]
                processed, dropped = kernel_stat(stats, STAT_PROCESSED), kernel_stat(stats, STAT_DROPPED)
                read_at = time.time()
                time.sleep(2.5)  # > 2 scrape intervals
                if (kernel_stat(stats, STAT_PROCESSED), kernel_stat(stats, STAT_DROPPED)) != (
                    processed,
                    dropped,
                ):
                    return None
                p = prometheus.scalar('bpf_packets_processed_total{program="xdp_firewall"}')
                d = prometheus.scalar('bpf_packets_dropped_total{program="xdp_firewall"}')
                if p is None or d is None or min(p[0], d[0]) <= read_at:
                    return None
                assert (p[1], d[1]) == (processed, dropped), ((p, d), (processed, dropped))
                return processed, dropped

            processed, dropped = wait_for(settled, 30, "Prometheus to show the settled kernel counts")
            assert dropped == BLOCKED_PACKETS
            entries = prometheus.scalar('bpf_map_entries{program="xdp_firewall",map="blocked_v4"}')
            assert entries is not None and entries[1] == 1  # the one address in blocked_ips
            assert processed >= ALLOWED_PACKETS + BLOCKED_PACKETS  # plus ARP

            # The agent's exposition, as promtool sees it: no parse error, and no lint
            # finding but the one on the seed's own name (an abbreviated unit, "_ns").
            text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
            check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
            findings = [line for line in (check.stdout + check.stderr).splitlines() if line.strip()]
            assert findings == [PROMTOOL_SEED_FINDING], findings
            assert check.returncode == 3, findings  # 3: lint findings only; 1 would be a parse error
            # The dropped packets' events reached the sink, each timed end to end.
            count = prometheus.scalar("bpfpipe_end_to_end_latency_seconds_count")
            assert count is not None and count[1] == BLOCKED_PACKETS
        finally:
            if prometheus is not None:
                prometheus.stop()
            code = agent.stop(30, signum=signal.SIGINT)
            for word in ("xdpgeneric", "xdpdrv"):
                subprocess.run(["ip", "link", "set", "dev", net.host_if, word, "off"], capture_output=True)
        assert code == 0, "\n".join(agent.lines)
        assert "Traceback" not in "\n".join(agent.lines)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)
