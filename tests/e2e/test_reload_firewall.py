"""The firewall's policy reloaded by SIGHUP, as an operator does it: ``bpfpipe run`` with the
xdp_firewall source on a veth into a namespace this test makes (IPv4 and IPv6), a steady
stream from inside, the file edited and ``kill -HUP``.

Counted on the receiving side: the allowed sources lose nothing across the reload;
the address blocked before is let through after, the one blocked after is not; a
CIDR prefix blocks every address in it and none outside. The program is never
detached (its id on the interface is the same before and after). The reload's
latency (signal to applied) is printed (``pytest -s``), never asserted on.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _cli import assert_accounts_balance
from _running_agent import RunningAgent, log_field
from _xdp_agent import xdp_prog_ids
from integration._dual_stack import DualStack
from integration._netns import interface_exists, netns_exists, veth_netns

pytestmark = pytest.mark.bpf

RELOADED = r'msg="config reloaded: version 2"'


def config_text(interface: str, blocked: list[str]) -> str:
    return (
        "watch_config = false\n"  # SIGHUP is the trigger under test
        '[source]\nuse = "xdp_firewall"\n'
        f'config = {{ options = {{ interface = "{interface}", mode = "skb" }}, '
        f"blocked_ips = {json.dumps(blocked)} }}\n"
        '[sink]\nuse = "null"\n'
    )


def test_sighup_swaps_blocked_ips_and_loses_no_allowed_packet(tmp_path: Path, unique_name: str) -> None:
    # Host numbers in the namespace's /24 (and the same in its IPv6 /64): 40 always
    # allowed; 20 blocked before the reload only; 24 blocked after only; 13 and 14 in
    # the prefix 12/30 (12..15) blocked after; 16 just outside it.
    allowed, formerly, newly, in_prefix, in_prefix2, outside = 40, 20, 24, 13, 14, 16
    hosts = [allowed, formerly, newly, in_prefix, in_prefix2, outside]
    with veth_netns(unique_name) as net:
        stack = DualStack(net, hosts, hosts)
        agent: RunningAgent | None = None
        try:
            v4, v6 = stack.v4, stack.v6
            before = [v4(formerly), v6(formerly)]
            after = [v4(newly), v6(newly), f"{v4(12)}/30", f"{v6(12)}/126"]
            config = tmp_path / "bpfpipe.toml"
            config.write_text(config_text(net.host_if, before))
            agent = RunningAgent("--config", str(config))
            agent.wait_for('msg="startup: mark ready"', timeout=120)
            (prog_id,) = xdp_prog_ids(net.host_if)

            sources = [f(h) for h in hosts for f in (v4, v6)]
            blocked_before = {v4(formerly), v6(formerly)}
            blocked_after = {v4(h) for h in (newly, in_prefix, in_prefix2)} | {
                v6(h) for h in (newly, in_prefix, in_prefix2)
            }
            # Warm-up (ARP), and the starting policy as configured.
            assert stack.send(sources, 1) == Counter(dict.fromkeys(sources, 1))
            passed = stack.receive(lambda c: sum(c.values()) >= len(sources) - len(blocked_before))
            assert passed == Counter(dict.fromkeys(set(sources) - blocked_before, 1))

            # A steady stream (one datagram per source every 2 ms, ~3 s) while the file
            # is edited and SIGHUP sent about a second in.
            stream_sources = [v4(allowed), v6(allowed), v4(formerly), v6(formerly), v4(newly), v6(newly)]
            rounds = 1500
            with ThreadPoolExecutor(1) as pool:  # receive while sending: no socket buffer overflows
                receiving = pool.submit(
                    stack.receive, lambda c: c[v4(allowed)] >= rounds and c[v6(allowed)] >= rounds
                )
                stream = stack.stream(stream_sources, rounds=rounds, interval_ns=2_000_000)
                with contextlib.suppress(subprocess.TimeoutExpired):  # still sending, as intended
                    stream.wait(timeout=1.0)
                assert stream.poll() is None, "the stream ended before the reload"
                config.write_text(config_text(net.host_if, after))
                agent.signal(signal.SIGHUP)
                (applied,) = agent.wait_for(RELOADED, timeout=30)
                assert stream.poll() is None, "the stream ended before the reload was applied"
                out, err = stream.communicate(timeout=60)
                received = receiving.result(timeout=60)
            assert not err, err
            assert Counter(json.loads(out)) == Counter(dict.fromkeys(stream_sources, rounds))
            print(f"\nblocked_ips reload by SIGHUP (XDP firewall): {log_field(applied, 'duration_ms')} ms")

            # Zero allowed packets lost across the reload; the swapped ones changed sides mid-stream.
            assert received[v4(allowed)] == received[v6(allowed)] == rounds, received
            for source in (v4(formerly), v6(formerly)):
                assert 0 < received[source] < rounds, (source, received)  # blocked, then let through
            for source in (v4(newly), v6(newly)):
                assert 0 < received[source] < rounds, (source, received)  # let through, then blocked

            # Settled on the new policy: the prefix blocks every address in it and none outside.
            assert stack.send(sources, 10) == Counter(dict.fromkeys(sources, 10))
            expected = Counter(dict.fromkeys(set(sources) - blocked_after, 10))
            assert stack.receive(lambda c: sum(c.values()) >= sum(expected.values())) == expected

            assert xdp_prog_ids(net.host_if) == [prog_id], "the reload must not re-attach the program"
            assert agent.stop() == 0, agent.stderr
            fields = assert_accounts_balance(agent.stderr)
            # Every drop is an event at the sink: warm-up 2, the stream's blocked share, 60 after.
            swapped = [v4(formerly), v6(formerly), v4(newly), v6(newly)]
            dropped = len(swapped) * rounds - sum(received[s] for s in swapped)
            assert fields.get("outcome_delivered", 0) == len(blocked_before) + dropped + 60, agent.stderr
        finally:
            if agent is not None:
                agent.kill()
            stack.close()
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)
