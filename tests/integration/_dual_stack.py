"""The veth/namespace pair of ``_netns.veth_netns`` made dual-stack, with more source
addresses, a paced multi-source UDP stream from inside the namespace and per-family
receivers on the host side that count datagrams by source: for the XDP firewall's
policy tests (in-process and through ``bpfpipe run``)."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

# Runs inside the namespace: `rounds` rounds, each one datagram from every source
# (round-robin), `interval_ns` apart (0: back to back); prints what each source sent.
_STREAM = r"""
import json, socket, sys, time
spec = json.loads(sys.argv[1])
socks = []
for src in spec["sources"]:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((src, 0))
    socks.append((src, s, tuple(spec["dst6" if family == socket.AF_INET6 else "dst4"])))
sent = dict.fromkeys(spec["sources"], 0)
next_ns = time.monotonic_ns()
for _ in range(spec["rounds"]):
    for src, s, dst in socks:
        s.sendto(b"bpfpipe-policy", dst)
        sent[src] += 1
    if spec["interval_ns"]:
        next_ns += spec["interval_ns"]
        time.sleep(max(0, next_ns - time.monotonic_ns()) / 1e9)
print(json.dumps(sent))
"""


class DualStack:
    """The namespace pair with IPv6 too (``nodad``, no link-local addresses, so no
    neighbour discovery or MLD chatter), extra source addresses in the namespace,
    and a UDP receiver per family on the host side that counts datagrams by source."""

    def __init__(self, net: Any, v4_hosts: list[int], v6_hosts: list[int]) -> None:
        self.net = net
        subnet = ipaddress.ip_network(f"{net.host_addr}/24", strict=False)
        self.v4_base = subnet.network_address
        self.v6_prefix = ipaddress.ip_network(f"fd00:{net.netns[2:6]}:{net.netns[6:10]}::/64")
        self.host6 = str(self.v6_prefix.network_address + 1)
        inside = ["ip", "netns", "exec", net.netns]
        for command in (
            ["sysctl", "-q", "-w", f"net.ipv6.conf.{net.host_if}.addr_gen_mode=1"],
            ["sysctl", "-q", "-w", f"net.ipv6.conf.{net.host_if}.disable_ipv6=0"],
            ["ip", "-6", "addr", "add", f"{self.host6}/64", "dev", net.host_if, "nodad"],
            [*inside, "sysctl", "-q", "-w", f"net.ipv6.conf.{net.peer_if}.addr_gen_mode=1"],
            [*inside, "sysctl", "-q", "-w", f"net.ipv6.conf.{net.peer_if}.disable_ipv6=0"],
        ):
            run(command)
        for host in v4_hosts:
            run([*inside, "ip", "addr", "add", f"{self.v4(host)}/24", "dev", net.peer_if])
        for host in v6_hosts:
            run([*inside, "ip", "-6", "addr", "add", f"{self.v6(host)}/64", "dev", net.peer_if, "nodad"])
        # A permanent neighbour entry: the namespace never solicits the host (from a
        # source the firewall may be blocking), so every datagram leaves at once.
        mac = _link(net.host_if)["address"]
        run([*inside, "ip", "-6", "neigh", "replace", self.host6, "lladdr", mac, "dev", net.peer_if,
              "nud", "permanent"])  # fmt: skip
        self.sockets: dict[int, socket.socket] = {}
        for family, addr in ((socket.AF_INET, net.host_addr), (socket.AF_INET6, self.host6)):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            sock.bind((addr, 0))
            sock.settimeout(0.05)
            self.sockets[family] = sock

    def v4(self, host: int) -> str:
        return str(self.v4_base + host)

    def v6(self, host: int) -> str:
        return str(self.v6_prefix.network_address + host)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()

    def stream(self, sources: list[str], rounds: int, interval_ns: int = 0) -> subprocess.Popen[str]:
        spec = {
            "sources": sources,
            "rounds": rounds,
            "interval_ns": interval_ns,
            "dst4": [self.net.host_addr, self.sockets[socket.AF_INET].getsockname()[1]],
            "dst6": [self.host6, self.sockets[socket.AF_INET6].getsockname()[1]],
        }
        argv = ["ip", "netns", "exec", self.net.netns, sys.executable, "-c", _STREAM, json.dumps(spec)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def send(self, sources: list[str], rounds: int) -> Counter[str]:
        """Send and return what each source sent."""
        out, err = self.stream(sources, rounds).communicate(timeout=60)
        assert not err, err
        return Counter(json.loads(out))

    def receive(self, until: Callable[[Counter[str]], bool], quiet_s: float = 0.3) -> Counter[str]:
        """Datagrams by source until ``until(counts)`` holds and nothing came for ``quiet_s``."""
        counts: Counter[str] = Counter()
        last = time.monotonic()
        deadline = last + 30
        while time.monotonic() < deadline:
            got = False
            for sock in self.sockets.values():
                try:
                    while True:
                        _, (src, *_) = sock.recvfrom(2048)
                        counts[str(ipaddress.ip_address(src))] += 1
                        got = True
                        sock.settimeout(0)
                except (BlockingIOError, TimeoutError):
                    sock.settimeout(0.05)
            if got:
                last = time.monotonic()
            elif until(counts) and time.monotonic() - last >= quiet_s:
                return counts
        raise AssertionError(f"receiving never settled: {dict(counts)}")


def run(argv: list[str]) -> str:
    """Run ``argv``; its stdout (a failure names the command and quotes its stderr)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


def _link(interface: str) -> dict[str, Any]:
    link: dict[str, Any] = json.loads(run(["ip", "-j", "link", "show", "dev", interface]))[0]
    return link
