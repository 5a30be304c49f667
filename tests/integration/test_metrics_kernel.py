"""The exporter against a real XDP firewall: what /metrics says equals what the kernel counted.

Traffic stays inside a namespace pair this test creates (see _netns.py); the
pipeline's shutdown detaches XDP and the context manager deletes veth and netns.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import trio
from _exposition import parse, value
from _firewall_settings import firewall_settings
from _netns import interface_exists, interface_has_xdp, netns_exists, veth_netns

from bpf.loader import XdpFirewallProgram, load_program
from pipeline import build_pipeline
from pipeline.metrics import MetricsExporter
from pipeline.testing import wait_until

pytestmark = pytest.mark.bpf


def stable(read: Any) -> Any:
    for _ in range(50):
        first = read()
        time.sleep(0.05)
        if read() == first:
            return first
    raise AssertionError("kernel counters never settled")


async def test_exported_kernel_counters_equal_the_kernels(unique_name: str) -> None:
    with veth_netns(unique_name) as net:
        allowed_src, blocked_src = net.peer_addrs
        # The rate limit never limits here; it makes the program keep per-source state entries.
        config = firewall_settings(net.host_if, blocked_ips=[blocked_src], rate_limit={"pps": 1_000_000})
        pipe = build_pipeline(config)
        exporter = MetricsExporter(config)
        exporter.attach(pipe)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((net.host_addr, 0))
        port = receiver.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(pipe.run)
                program = pipe.nodes[0].program  # type: ignore[attr-defined]
                assert isinstance(program, XdpFirewallProgram)
                await trio.to_thread.run_sync(lambda: net.send_udp(allowed_src, port, 30))
                await trio.to_thread.run_sync(lambda: net.send_udp(blocked_src, port, 20))
                sink = pipe.contexts[-1].name
                await wait_until(lambda: pipe.statistics().stage(sink).delivered_events >= 20, timeout=10)
                stats = await trio.to_thread.run_sync(stable, program.kernel_stats)
                hist = program.latency_histogram()
                entries = {
                    name: sum(1 for _ in program.bpf[name.encode()])
                    for name in ("blocked_v4", "rate_limit_state")
                }
                s = parse(exporter.snapshot_text(pipe))
                pipe.stop()
            # The kernel's own counts (ARP and the like pass and count as processed too).
            assert stats["dropped"] == 20
            assert stats["processed"] >= 50
            assert value(s, "bpf_packets_processed_total", program="xdp_firewall") == stats["processed"]
            assert value(s, "bpf_packets_dropped_total", program="xdp_firewall") == stats["dropped"]
            errors = value(s, "bpf_errors_total", layer="kernel", component="xdp_firewall", kind="errors")
            assert errors == stats["errors"]
            # Entries as a key-by-key walk counts them (blocked_v4: an LPM trie).
            assert entries["blocked_v4"] == 1 and entries["rate_limit_state"] >= 1
            for name, count in entries.items():
                assert value(s, "bpf_map_entries", program="xdp_firewall", map=name) == count
            assert value(s, "bpf_map_max_entries", program="xdp_firewall", map="blocked_v4") == 1024
            assert value(s, "bpf_processing_latency_ns_count", program="xdp_firewall") == sum(hist.values())
            assert sum(hist.values()) == stats["processed"]
            assert value(s, "bpf_processing_latency_ns_bucket", program="xdp_firewall", le="+Inf") == sum(
                hist.values()
            )
            assert 0 <= value(s, "bpf_ringbuf_usage_percent", program="xdp_firewall") <= 100
            assert value(s, "bpfpipe_kernel_events_total", program="xdp_firewall", fate="emitted") == 20
            # The 20 drop events reached the sink, each one timed from its kernel timestamp.
            assert value(s, "bpfpipe_end_to_end_latency_seconds_count") == 20
            assert value(s, "bpfpipe_end_to_end_latency_seconds_sum") > 0
            assert value(s, "bpfpipe_events_total", outcome="delivered", stage=sink, reason="") == 20
            # After the pipeline closed the program: the final counters, not an error.
            assert program.closed
            final = parse(exporter.snapshot_text(pipe))
            assert value(final, "bpf_packets_dropped_total", program="xdp_firewall") == 20
        finally:
            receiver.close()
        assert not interface_has_xdp(net.host_if)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


def test_map_usage_counts_a_full_65536_entry_map_exactly() -> None:
    """Batch-lookup counting against bcc's key-by-key walk: empty, partial and full.
    The ``exec`` program's ``exec_procs`` (u32 pid -> struct): keys above any pid_max
    (at most 2**22) are never touched by the program; real processes may add and
    remove their own entries meanwhile, so each count is compared with a walk taken
    right after it, and the full map with its capacity."""
    program = load_program("exec", ring_buffer_size=4096, map_size=65536)
    try:
        table = program.bpf[b"exec_procs"]
        assert program.map_usage()["exec_procs"][1] == 65536 == table.max_entries
        fill(table, range(1 << 24, (1 << 24) + 1000))
        for _ in range(20):  # a quiet moment: no process started or ended between the counts
            counted, walked, again = program.map_usage()["exec_procs"][0], len(table), program.map_usage()
            if counted == walked == again["exec_procs"][0]:
                break
        assert counted == walked >= 1000, (counted, walked)
        for start in range((1 << 24) + 1000, (1 << 24) + 65536, 4096):
            try:
                fill(table, range(start, start + 4096))
            except Exception:  # E2BIG: full (real processes hold some slots)
                break
        assert program.map_usage()["exec_procs"] == (65536, 65536) == (len(table), table.max_entries)
        del table[table.Key(1 << 24)]
        assert program.map_usage()["exec_procs"][0] <= 65535
    finally:
        program.close()


def fill(table: Any, keys: range) -> None:
    n = len(keys)
    key_array = (table.Key * n)(*[table.Key(k) for k in keys])
    table.items_update_batch(key_array, (table.Leaf * n)())
