"""xdp_firewall on a real veth pair: blocklist, per-source rate limit, drop events, stats,
and the policy: CIDR prefixes for IPv4 and IPv6, changed by difference under traffic,
set from the source's config and changed live.

Traffic stays inside a namespace pair this test creates (see _netns.py; IPv6 is
added on the same pair by ``DualStack``), and the finally blocks detach XDP and
delete the veth and namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest
import trio
from _bcc_records import BccRecords
from _dual_stack import DualStack, run
from _firewall_settings import firewall_settings
from _netns import interface_exists, interface_has_xdp, netns_exists, veth_netns

from bpf.attach import attached_xdp
from bpf.firewall_policy import RateLimit, event_address, parse_blocked_ips
from bpf.loader import BpfLoadError, XdpFirewallProgram, load_program
from pipeline import InflightBudget, Ledger, StageContext, build_pipeline
from pipeline._build import build_specs
from pipeline.testing import wait_until
from stages.programs import XdpFirewallSource

pytestmark = pytest.mark.bpf

DROP_BLOCKED, DROP_RATE_LIMITED = 1, 2  # enum xdp_drop_reason in xdp_firewall.h
EVENT_XDP_DROP = 3
IPPROTO_UDP, IPPROTO_DSTOPTS = 17, 60

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
            # The XDP function, and bpfpipe.h's heartbeat tracepoint.
            (attachment,) = [a for a in program.attachments if a.attach_point.startswith("xdp:")]
            assert len(program.attachments) == 2
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
                assert event["family"] == socket.AF_INET
                assert bytes(event["saddr6"]) == bytes(event["daddr6"]) == bytes(16)
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


# -- the policy: CIDR prefixes (IPv4 and IPv6), changes by difference, the source's config ----


def drop_sources(events: list[Any]) -> Counter[str]:
    """Drop events (type xdp_drop) by source address."""
    return Counter(
        str(event_address(int(e["family"]), int(e["saddr"]), e["saddr6"]))
        for e in events
        if int(e["type"]) == EVENT_XDP_DROP
    )


def test_a_cidr_prefix_blocks_every_address_in_it_and_none_outside(unique_name: str) -> None:
    """IPv4 and IPv6: a prefix blocks the addresses inside it and no other, drop events
    carry the family and the 16-byte address; then the rate limit keys an IPv6 source
    by its /64."""
    with veth_netns(unique_name) as net:
        # Inside 10.x.y.8/29 and fd00:..::8/125: 8, 11, 15. Just outside: 7, 16.
        hosts = [7, 8, 11, 15, 16]
        stack = DualStack(net, hosts, hosts)
        program = load_program(
            "xdp_firewall", ring_buffer_size=256 * 1024, map_size=1024, options={"interface": net.host_if}
        )
        try:
            assert isinstance(program, XdpFirewallProgram)
            drops = Drops(program)
            sources = [stack.v4(h) for h in hosts] + [stack.v6(h) for h in hosts]
            assert stack.send(sources, 1) == Counter(dict.fromkeys(sources, 1))  # warm-up (ARP)
            assert stack.receive(lambda c: sum(c.values()) >= len(sources)) == Counter(
                dict.fromkeys(sources, 1)
            )

            v4_prefix, v6_prefix = f"{stack.v4(8)}/29", f"{stack.v6(8)}/125"
            change = program.apply_policy([v4_prefix, v6_prefix])
            assert change.added == (ipaddress.ip_network(v4_prefix), ipaddress.ip_network(v6_prefix))
            assert change.removed == () and change.rate_limit is None and change.gapless
            blocked = program.blocked_prefixes()
            assert blocked.v4 == {ipaddress.ip_network(v4_prefix)}
            assert blocked.v6 == {ipaddress.ip_network(v6_prefix)}
            # A key with host bits (as bpftool could write it) is the same trie entry.
            table = program.bpf[b"blocked_v4"]
            table[table.Key(29, (ctypes.c_ubyte * 4)(*ipaddress.IPv4Address(stack.v4(11)).packed))] = (
                table.Leaf(1)
            )
            assert not program.apply_policy([v4_prefix, v6_prefix]).changed
            assert program.blocked_prefixes() == blocked
            before, _ = stable_stats(program)

            sent = stack.send(sources, 10)
            inside = [stack.v4(h) for h in (8, 11, 15)] + [stack.v6(h) for h in (8, 11, 15)]
            outside = [stack.v4(h) for h in (7, 16)] + [stack.v6(h) for h in (7, 16)]
            received = stack.receive(lambda c: sum(c.values()) >= 10 * len(outside))
            assert received == Counter(dict.fromkeys(outside, 10))
            events = drops.take(10 * len(inside))
            assert drop_sources(events) == Counter(dict.fromkeys(inside, 10))
            after, _ = stable_stats(program)
            assert delta(after, before)["dropped"] == 10 * len(inside) == sum(sent[s] for s in inside)
            port6 = stack.sockets[socket.AF_INET6].getsockname()[1]
            v6_events = [e for e in events if int(e["family"]) == socket.AF_INET6]
            assert len(v6_events) == 30
            for event in v6_events:
                assert event["reason"] == DROP_BLOCKED
                assert event["saddr"] == event["daddr"] == 0
                assert ipaddress.IPv6Address(bytes(event["daddr6"])) == ipaddress.IPv6Address(stack.host6)
                assert event["protocol"] == IPPROTO_UDP and event["dport"] == port6 and event["sport"] > 0
                assert event["pkt_len"] == 14 + 40 + 8 + len(b"bpfpipe-policy")

            # An IPv6 packet with an extension header: blocked all the same (the fixed header
            # decides); its event names the extension header as the protocol, ports 0.
            ext_sender = (
                "import socket, sys; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
                "s.bind((sys.argv[1], 0)); "
                "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0])); "
                "s.sendto(b'bpfpipe-policy', (sys.argv[2], int(sys.argv[3])))"
            )
            in_netns = ["ip", "netns", "exec", net.netns, sys.executable, "-c", ext_sender]
            run([*in_netns, stack.v6(11), stack.host6, str(port6)])
            (ext_event,) = drops.take(1)
            assert event_address(int(ext_event["family"]), 0, ext_event["saddr6"]) == ipaddress.ip_address(
                stack.v6(11)
            )
            assert (ext_event["protocol"], ext_event["sport"], ext_event["dport"]) == (IPPROTO_DSTOPTS, 0, 0)
            assert ext_event["pkt_len"] == 14 + 40 + 8 + 8 + len(b"bpfpipe-policy")

            # Removing the prefixes lets everyone through again.
            change = program.apply_policy([])
            assert set(change.removed) == {ipaddress.ip_network(v4_prefix), ipaddress.ip_network(v6_prefix)}
            assert stack.send(sources, 3) == Counter(dict.fromkeys(sources, 3))
            assert stack.receive(lambda c: sum(c.values()) >= 30) == Counter(dict.fromkeys(sources, 3))

            # Rate limit, 20 back to back then 1/s: per IPv4 address, per IPv6 /64 (the
            # two IPv6 sources share one bucket). Sending takes well under a second, so
            # each bucket admits 20, or 21 if a second boundary passes.
            change = program.apply_policy([], RateLimit(pps=1, burst=20))
            assert change.rate_limit == (RateLimit(), RateLimit(pps=1, burst=20)) and not change.added
            limited = [stack.v4(7), stack.v4(16), stack.v6(7), stack.v6(16)]
            assert stack.send(limited, 100) == Counter(dict.fromkeys(limited, 100))
            received = stack.receive(lambda c: sum(c.values()) >= 60)
            assert 20 <= received[stack.v4(7)] <= 21 and 20 <= received[stack.v4(16)] <= 21, received
            assert 20 <= received[stack.v6(7)] + received[stack.v6(16)] <= 21, received
            assert received[stack.v6(7)] > 0 and received[stack.v6(16)] > 0, received  # sent interleaved
            limited_drops = drops.take(400 - sum(received.values()))
            assert {int(e["reason"]) for e in limited_drops} == {DROP_RATE_LIMITED}
            assert drop_sources(limited_drops) == Counter({s: 100 - received[s] for s in limited})
        finally:
            program.close()
            stack.close()
        assert not interface_has_xdp(net.host_if)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


def test_policy_changes_by_difference_lose_no_allowed_packet(unique_name: str) -> None:
    """A steady stream from eight sources while the policy flips ~every 20 ms between
    P1 = {S, C} and P2 = {S's /30 (or /126), B} (per family). Exactly: the allowed
    sources lose nothing, S (blocked by both) never passes, and for B and C every
    datagram is either received or reported dropped. Then B is blocked and C passes."""
    with veth_netns(unique_name) as net:
        allowed, still, newly, formerly = 40, 13, 20, 24  # host numbers; 13 is in 12/30 (12..15)
        hosts = [allowed, still, newly, formerly]
        stack = DualStack(net, hosts, hosts)
        program = load_program(
            "xdp_firewall", ring_buffer_size=4 << 20, map_size=1024, options={"interface": net.host_if}
        )
        try:
            assert isinstance(program, XdpFirewallProgram)
            drops = Drops(program)
            a4, s4, b4, c4 = (stack.v4(h) for h in hosts)
            a6, s6, b6, c6 = (stack.v6(h) for h in hosts)
            sources = [a4, s4, b4, c4, a6, s6, b6, c6]
            assert stack.send(sources, 1) == Counter(dict.fromkeys(sources, 1))  # warm-up (ARP)
            assert stack.receive(lambda c: sum(c.values()) >= 8) == Counter(dict.fromkeys(sources, 1))

            p1 = [s4, c4, s6, c6]
            p2 = [f"{stack.v4(12)}/30", b4, f"{stack.v6(12)}/126", b6]
            program.apply_policy(p1)
            with ThreadPoolExecutor(1) as pool:  # receive while sending: no socket buffer overflows
                receiving = pool.submit(stack.receive, lambda c: c[a4] >= 1000 and c[a6] >= 1000)
                stream = stack.stream(sources, rounds=1000, interval_ns=2_000_000)
                changes = []
                while stream.poll() is None:
                    changes.append(program.apply_policy(p2 if len(changes) % 2 == 0 else p1))
                    time.sleep(0.02)
                out, err = stream.communicate(timeout=60)
                received = receiving.result(timeout=60)
            assert not err, err
            sent = Counter(json.loads(out))
            assert sent == Counter(dict.fromkeys(sources, 1000))
            dropped = drop_sources(drops.take(sum(sent.values()) - sum(received.values())))

            assert len(changes) >= 10, "the stream ended before the policy changed often"
            assert all(change.gapless and len(change.added) == len(change.removed) == 4 for change in changes)
            assert received[a4] == received[a6] == 1000 and dropped[a4] == dropped[a6] == 0
            assert received[s4] == received[s6] == 0 and dropped[s4] == dropped[s6] == 1000
            for source in (b4, c4, b6, c6):
                assert received[source] + dropped[source] == 1000, (source, received, dropped)
                assert received[source] > 0 and dropped[source] > 0, (source, received, dropped)
            stats, _ = stable_stats(program)
            assert stats["dropped"] == sum(dropped.values()) == stats["emitted"]
            assert stats["lost_reserve"] == 0

            # Settle on P2: the newly blocked addresses are dropped, the unblocked pass.
            program.apply_policy(p2)
            assert stack.send(sources, 20) == Counter(dict.fromkeys(sources, 20))
            received = stack.receive(lambda c: sum(c.values()) >= 80)
            assert received == Counter(dict.fromkeys([a4, a6, c4, c6], 20))
            assert drop_sources(drops.take(80)) == Counter(dict.fromkeys([s4, b4, s6, b6], 20))

            # Back to back: S floods while the policy flips as fast as it can be written.
            # Clear-and-refill, or deleting before inserting, would open a window of some
            # microseconds per change: at this rate some of S's datagrams would get through.
            before, _ = stable_stats(program)
            flood = stack.stream([s4, s6], rounds=50_000)
            flips = 0
            while flood.poll() is None:
                program.apply_policy(p2 if flips % 2 == 0 else p1)
                flips += 1
            out, err = flood.communicate(timeout=60)
            assert not err, err
            sent = Counter(json.loads(out))
            assert stack.receive(lambda c: True) == Counter()
            after, _ = stable_stats(program)
            assert flips >= 50, flips
            assert delta(after, before)["dropped"] == sent[s4] + sent[s6] == 100_000
        finally:
            program.close()
            stack.close()
        assert not interface_has_xdp(net.host_if)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


async def test_the_running_source_starts_with_its_policy_and_reconfigures_it_live(unique_name: str) -> None:
    """Run by the runtime: the config's policy is in the maps when the source reports
    started; ``reconfigure`` (what a reload calls) swaps the blocked address while the
    pipeline runs, and every drop event reaches the sink."""
    with veth_netns(unique_name) as net:
        allowed_src, blocked_src = net.peer_addrs
        config = firewall_settings(
            net.host_if,
            blocked_ips=[blocked_src, "2001:db8::/32"],
            rate_limit={"pps": RATE_PPS, "burst": BURST},
        )
        pipe = build_pipeline(config)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((net.host_addr, 0))
        receiver.setblocking(False)
        port = receiver.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(pipe.run)
                source = pipe.nodes[0]
                assert isinstance(source, XdpFirewallSource)
                program = source.program
                assert isinstance(program, XdpFirewallProgram)
                assert program.blocked_prefixes() == parse_blocked_ips([blocked_src, "2001:db8::/32"])
                assert program.rate_limit() == RateLimit(pps=RATE_PPS, burst=BURST)

                await trio.to_thread.run_sync(lambda: net.send_udp(allowed_src, port, 10))
                await trio.to_thread.run_sync(lambda: net.send_udp(blocked_src, port, 30))
                got = await trio.to_thread.run_sync(lambda: receive(receiver, 10))
                assert got == Counter({allowed_src: 10})

                new = msgspec.structs.replace(
                    source.config, blocked_ips=[allowed_src], rate_limit=RateLimit()
                )
                source.reconfigure(new)
                assert program.blocked_prefixes() == parse_blocked_ips([allowed_src])
                assert program.rate_limit() == RateLimit()
                await trio.to_thread.run_sync(lambda: net.send_udp(allowed_src, port, 20))
                await trio.to_thread.run_sync(lambda: net.send_udp(blocked_src, port, 20))
                got = await trio.to_thread.run_sync(lambda: receive(receiver, 20))
                assert got == Counter({blocked_src: 20})
                sink = pipe.contexts[-1].name
                await wait_until(lambda: pipe.statistics().stage(sink).delivered_events >= 50, timeout=10)
                stats = await trio.to_thread.run_sync(lambda: stable_stats(program)[0])
                pipe.stop()
            assert stats["dropped"] == stats["emitted"] == 50
            assert pipe.statistics().stage(sink).delivered_events == 50
        finally:
            receiver.close()
        assert not interface_has_xdp(net.host_if)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


def test_the_sources_start_applies_the_configured_rate_limit_before_attaching(unique_name: str) -> None:
    """The source's own start path (``load_program`` with its ``prepare``), without the
    runtime: the maps hold the config's policy before XDP is attached, the flood is
    limited as configured, and ``reconfigure`` changes the policy without reattaching."""
    with veth_netns(unique_name) as net:
        limited_src, blocked_src = net.peer_addrs
        raw = firewall_settings(
            net.host_if,
            blocked_ips=[blocked_src, "2001:db8::/32"],
            rate_limit={"pps": RATE_PPS, "burst": BURST},
        )
        (spec, *_), _ = build_specs(raw)
        source = XdpFirewallSource(
            spec.config, StageContext("xdp_firewall", "source", Ledger(), InflightBudget())
        )
        seen_at_prepare: list[tuple[bool, Any, RateLimit]] = []
        prepare = source._prepare_maps

        def watching_prepare(program: Any) -> None:
            prepare(program)
            seen_at_prepare.append(
                (interface_has_xdp(net.host_if), program.blocked_prefixes(), program.rate_limit())
            )

        source._prepare_maps = watching_prepare  # type: ignore[method-assign]
        program = source.load_program()
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            assert isinstance(program, XdpFirewallProgram)
            assert seen_at_prepare == [
                (
                    False,
                    parse_blocked_ips([blocked_src, "2001:db8::/32"]),
                    RateLimit(pps=RATE_PPS, burst=BURST),
                )
            ]
            (attachment,) = [a for a in program.attachments if a.attach_point.startswith("xdp:")]
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            receiver.bind((net.host_addr, 0))
            receiver.setblocking(False)
            port = receiver.getsockname()[1]
            drops = Drops(program)

            flood = net.send_udp(
                limited_src, port, FLOOD_PACKETS, interval_ns=FLOOD_INTERVAL_NS, burst=FLOOD_BURST
            )
            net.send_udp(blocked_src, port, 30)
            got = receive(receiver, 1)
            passed = got[limited_src]
            expected = BURST + RATE_PPS * flood.elapsed_s
            assert abs(passed - expected) <= 0.05 * expected + 3, (got, expected, flood.elapsed_s)
            assert got[blocked_src] == 0
            events = drops.take(FLOOD_PACKETS - passed + 30)
            reasons = Counter(
                (str(event_address(int(e["family"]), int(e["saddr"]), e["saddr6"])), int(e["reason"]))
                for e in events
            )
            assert reasons == Counter(
                {(limited_src, DROP_RATE_LIMITED): FLOOD_PACKETS - passed, (blocked_src, DROP_BLOCKED): 30}
            )

            # Live: swap the blocked address, rate limit off; the same attachment throughout.
            new = msgspec.structs.replace(source.config, blocked_ips=[limited_src], rate_limit=RateLimit())
            source.reconfigure(new)
            assert source.config is new
            assert program.blocked_prefixes() == parse_blocked_ips([limited_src])
            assert program.rate_limit() == RateLimit()
            net.send_udp(limited_src, port, 25)
            net.send_udp(blocked_src, port, 25)
            assert receive(receiver, 25) == Counter({blocked_src: 25})
            assert drop_sources(drops.take(25)) == Counter({limited_src: 25})
            assert [a.prog_id for a in attached_xdp(net.host_if)] == [attachment.prog_id]
            with pytest.raises(ValueError, match=r"^options cannot change while the source runs"):
                source.reconfigure(msgspec.structs.replace(new, options={"interface": "lo"}))
            stats, _ = stable_stats(program)
            assert stats["dropped"] == FLOOD_PACKETS - passed + 30 + 25 == stats["emitted"]
        finally:
            program.close()
            receiver.close()
        assert not interface_has_xdp(net.host_if)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)
