"""xdp_firewall on a real veth pair: blocklist, per-source rate limit, drop events, stats.

Traffic stays inside a namespace pair this test creates (see _netns.py), and
the finally blocks detach XDP and delete the veth and namespace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections import Counter

import pytest
from _bcc_records import BccRecords
from _netns import interface_exists, interface_has_xdp, netns_exists, veth_netns

from bpf.attach import attached_xdp
from bpf.loader import BpfLoadError, XdpFirewallProgram, load_program

pytestmark = pytest.mark.bpf

DROP_BLOCKED, DROP_RATE_LIMITED = 1, 2  # enum xdp_drop_reason in xdp_firewall.h
EVENT_XDP_DROP = 3
IPPROTO_UDP = 17

# The flood: 2000 packets in bursts of 10 every 2.5 ms (4000 pps for 0.5 s, 20x the
# limit). GCRA admits BURST at once, then one per 1/RATE_PPS s; a burst of 50 also
# absorbs the sender being descheduled for up to ~0.25 s on a busy machine.
RATE_PPS, BURST = 200, 50
FLOOD_PACKETS, FLOOD_INTERVAL_NS, FLOOD_BURST = 2000, 2_500_000, 10


Drops = BccRecords  # drop events read with bcc's own ring-buffer consumer


def receive(
    sock: socket.socket, expected: int, timeout_s: float = 3.0, settle_s: float = 0.2
) -> Counter[str]:
    """Source addresses of datagrams received until ``expected`` arrived and the socket went quiet."""
    sources: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            _, (src, _) = sock.recvfrom(2048)
        except BlockingIOError:
            if sum(sources.values()) >= expected and time.monotonic() - quiet_since >= settle_s:
                break
            time.sleep(0.005)
            continue
        sources[src] += 1
        quiet_since = time.monotonic()
    return sources


def stable_stats(program: XdpFirewallProgram) -> tuple[dict[str, int], dict[str, int]]:
    """Stats and latency histogram read while no packet is in the program."""
    for _ in range(50):
        stats, hist = program.kernel_stats(), program.latency_histogram()
        if program.kernel_stats() == stats and program.latency_histogram() == hist:
            return stats, hist
        time.sleep(0.02)
    raise AssertionError("XDP counters never settled")


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


def test_xdp_firewall_blocks_rate_limits_and_reports_drops(unique_name: str) -> None:
    with veth_netns(unique_name) as net:
        allowed_src, limited_src = net.peer_addrs
        program = load_program(
            "xdp_firewall",
            ring_buffer_size=256 * 1024,
            map_size=1024,
            options={"interface": net.host_if, "mode": "skb"},
        )
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            receiver.bind((net.host_addr, 0))
            receiver.setblocking(False)
            port = receiver.getsockname()[1]
            assert isinstance(program, XdpFirewallProgram)
            assert interface_has_xdp(net.host_if)
            (attachment,) = program.attachments
            assert attachment.attach_point == f"xdp:{net.host_if}:skb"
            assert attachment.prog_id > 0
            # A second firewall never replaces the first, though it is the same program:
            # this process holds it, so it is not stale.
            with pytest.raises(BpfLoadError, match=rf"already attached .* running process {os.getpid()};"):
                load_program("xdp_firewall", ring_buffer_size=4096, map_size=1024, options=program.options)
            assert [p.prog_id for p in attached_xdp(net.host_if)] == [attachment.prog_id]
            assert interface_has_xdp(net.host_if)
            drops = Drops(program)

            # Warm up (ARP), then measure from a quiet baseline.
            net.send_udp(allowed_src, port, 1)
            net.send_udp(limited_src, port, 1)
            assert receive(receiver, 2) == Counter({allowed_src: 1, limited_src: 1})
            assert drops.take(0, timeout_s=0.1) == []
            baseline, _ = stable_stats(program)

            # Blocklist: one source dropped, the other delivered.
            program.block_ipv4(limited_src)
            assert program.blocked_ipv4() == {ipaddress.IPv4Address(limited_src)}
            sent_allowed = net.send_udp(allowed_src, port, 50)
            sent_blocked = net.send_udp(limited_src, port, 40)
            assert receive(receiver, 50) == Counter({allowed_src: 50})
            blocked_events = drops.take(40)
            stats, _ = stable_stats(program)
            assert delta(stats, baseline)["dropped"] == 40
            per_cpu = program.kernel_stats_per_cpu()
            assert len(per_cpu) >= os.cpu_count()  # type: ignore[operator]
            assert sum(cpu["dropped"] for cpu in per_cpu) == stats["dropped"]
            assert all(cpu["processed"] >= cpu["dropped"] for cpu in per_cpu)
            assert len(blocked_events) == 40
            for event in blocked_events:
                assert event["type"] == EVENT_XDP_DROP
                assert event["rate"] == 1
                assert ipaddress.IPv4Address(int(event["saddr"])) == ipaddress.IPv4Address(limited_src)
                assert ipaddress.IPv4Address(int(event["daddr"])) == ipaddress.IPv4Address(net.host_addr)
                assert event["sport"] == sent_blocked.sport
                assert event["dport"] == port
                assert event["protocol"] == IPPROTO_UDP
                assert event["reason"] == DROP_BLOCKED
                assert event["ifindex"] == socket.if_nametoindex(net.host_if)
                assert event["pkt_len"] == 14 + 20 + 8 + len(b"bpfpipe-xdp-test")
            assert sent_allowed.sent == 50

            # Rate limit: unblock, then flood at 20x the per-source limit.
            assert program.unblock_ipv4(limited_src) is True
            assert program.unblock_ipv4(limited_src) is False
            program.set_rate_limit(RATE_PPS, burst=BURST)
            before_flood, _ = stable_stats(program)
            flood = net.send_udp(
                limited_src, port, FLOOD_PACKETS, interval_ns=FLOOD_INTERVAL_NS, burst=FLOOD_BURST
            )
            passed = receive(receiver, 1)[limited_src]
            # Admitted: BURST + RATE_PPS x flood duration, within 5% + 3 packets.
            expected = BURST + RATE_PPS * flood.elapsed_s
            assert abs(passed - expected) <= 0.05 * expected + 3, (passed, expected, flood.elapsed_s)
            limited_events = drops.take(FLOOD_PACKETS - passed)
            after_flood, hist = stable_stats(program)
            assert delta(after_flood, before_flood)["dropped"] == FLOOD_PACKETS - passed
            assert len(limited_events) == FLOOD_PACKETS - passed
            assert {int(event["reason"]) for event in limited_events} == {DROP_RATE_LIMITED}
            assert {int(event["saddr"]) for event in limited_events} == {
                int(ipaddress.IPv4Address(limited_src))
            }

            # Every drop went through the gate and out; every packet was timed once.
            assert after_flood["events"] == after_flood["emitted"] == after_flood["dropped"]
            assert after_flood["sampled_out"] == after_flood["lost_reserve"] == 0
            assert sum(hist.values()) == after_flood["processed"] > 0
            assert list(hist) == ["lt_100ns", "lt_500ns", "lt_1us", "lt_5us", "lt_10us", "ge_10us"]
        finally:
            program.close()
            receiver.close()
        assert not interface_has_xdp(net.host_if)
        program.close()  # idempotent
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


def test_a_program_with_our_name_but_another_tag_is_not_replaced(unique_name: str) -> None:
    """Another build of xdp_firewall (same name, different instructions) may belong to
    someone else's bpfpipe: say what is attached and how to remove it, touch nothing."""
    from bcc import BPF

    with veth_netns(unique_name) as net:
        other = BPF(text=b"int xdp_firewall(struct xdp_md *ctx) { return XDP_PASS; }")
        try:
            fn = other.load_func(b"xdp_firewall", BPF.XDP)
            BPF.attach_xdp(net.host_if.encode(), fn, BPF.XDP_FLAGS_SKB_MODE)
            (before,) = attached_xdp(net.host_if)
            assert before.name == "xdp_firewall"
            with pytest.raises(BpfLoadError) as caught:
                load_program(
                    "xdp_firewall", ring_buffer_size=4096, map_size=1024, options={"interface": net.host_if}
                )
            message = str(caught.value)
            assert f"prog id {before.prog_id}, name 'xdp_firewall', tag {before.tag}, skb mode" in message
            assert "same name but a different tag" in message
            assert f"`ip link set dev {net.host_if} xdpgeneric off`" in message
            assert attached_xdp(net.host_if) == [before]
        finally:
            BPF.remove_xdp(net.host_if.encode(), BPF.XDP_FLAGS_SKB_MODE)
            other.cleanup()
        assert not interface_has_xdp(net.host_if)
    assert not interface_exists(net.host_if)
