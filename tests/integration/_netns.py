"""A throwaway network namespace joined to the host by a veth pair, for XDP tests.

Everything lives on interfaces this helper creates: a private 10.x.y.0/24
chosen not to overlap any existing route, one address on the host-side veth
and two in the namespace (so tests can send from two sources). The context
manager removes the veth (which removes its peer) and the namespace, whatever
happened inside it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Runs inside the namespace: send UDP from one source address in bursts of
# `burst` datagrams every `interval_ns` (sleeping, not spinning, in between), and
# report CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns) around the sends.
_SENDER = r"""
import json, socket, sys, time
src, dst = sys.argv[1], sys.argv[2]
port, count, interval_ns, burst = (int(arg) for arg in sys.argv[3:7])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
payload = b"bpfpipe-xdp-test"
first = time.monotonic_ns()
deadline = first
for i in range(count):
    if interval_ns and i % burst == 0:
        time.sleep(max(0, deadline - time.monotonic_ns()) / 1e9)
        deadline += interval_ns
    s.sendto(payload, (dst, port))
last = time.monotonic_ns()
print(json.dumps({"sport": s.getsockname()[1], "first_ns": first, "last_ns": last, "sent": count}))
"""


@dataclass(frozen=True)
class SendReport:
    sport: int
    first_ns: int
    last_ns: int
    sent: int

    @property
    def elapsed_s(self) -> float:
        return (self.last_ns - self.first_ns) / 1e9


@dataclass(frozen=True)
class VethNetns:
    netns: str
    host_if: str
    peer_if: str
    host_addr: str
    peer_addrs: tuple[str, str]

    def send_udp(
        self, src: str, port: int, count: int, *, interval_ns: int = 0, burst: int = 1
    ) -> SendReport:
        """Send ``count`` UDP datagrams from ``src`` (in the namespace) to the host-side
        address: all at once, or ``burst`` at a time every ``interval_ns``."""
        args = [src, self.host_addr, str(port), str(count), str(interval_ns), str(burst)]
        out = _run(["ip", "netns", "exec", self.netns, sys.executable, "-c", _SENDER, *args])
        return SendReport(**json.loads(out))


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _free_subnet(seed: bytes) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no route in any table of the host namespace."""
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]")
    taken = []
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            taken.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    for offset in range(256):
        candidate = ipaddress.IPv4Network(f"10.{200 + (seed[0] + offset) % 50}.{seed[1]}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 for the test namespace")


@contextmanager
def veth_netns(name: str) -> Iterator[VethNetns]:
    """A namespace ``name`` joined to the host by veth ``<name>h`` <-> ``<name>p`` (names <= 15 chars)."""
    host_if, peer_if = f"{name}h", f"{name}p"
    assert len(host_if) <= 15, host_if
    subnet = _free_subnet(uuid.uuid4().bytes)
    hosts = list(subnet.hosts())
    pair = VethNetns(
        netns=name,
        host_if=host_if,
        peer_if=peer_if,
        host_addr=str(hosts[0]),
        peer_addrs=(str(hosts[1]), str(hosts[2])),
    )
    try:
        _run(["ip", "netns", "add", name])
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name])
        _run(["sysctl", "-q", "-w", f"net.ipv6.conf.{host_if}.disable_ipv6=1"])
        _run(["ip", "addr", "add", f"{pair.host_addr}/24", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        inside = ["ip", "netns", "exec", name]
        # No IPv6 on the pair: no spontaneous neighbour discovery traffic, so
        # every packet the program sees is one the test sent (or its ARP).
        _run([*inside, "sysctl", "-q", "-w", f"net.ipv6.conf.{peer_if}.disable_ipv6=1"])
        for addr in pair.peer_addrs:
            _run([*inside, "ip", "addr", "add", f"{addr}/24", "dev", peer_if])
        _run([*inside, "ip", "link", "set", peer_if, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        yield pair
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def interface_has_xdp(interface: str) -> bool:
    done = subprocess.run(["ip", "-j", "link", "show", "dev", interface], capture_output=True, text=True)
    if done.returncode != 0:
        return False
    return any("xdp" in link for link in json.loads(done.stdout))


def interface_exists(interface: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", interface], capture_output=True).returncode == 0


def netns_exists(name: str) -> bool:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return any(line.split()[0] == name for line in done.stdout.splitlines() if line.strip())
