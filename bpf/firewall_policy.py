"""The XDP firewall's policy as config: parse, validate, normalise, and plan a change (pure).

No kernel and no I/O here: :class:`bpf.programs.XdpFirewallProgram` writes what
this module decides into the program's maps, and ``stages/programs.py`` validates
a source's config with it at build time (so ``bpfpipe check`` and a reload see the
same errors as a start).

The policy
----------
``blocked_ips``: IPv4 and IPv6 addresses and CIDR prefixes (``"10.0.0.5"``,
``"192.168.0.0/16"``, ``"2001:db8::/32"``, ``"::1"``). An address is its /32 or
/128. Duplicates and overlaps are fine (the kernel's LPM tries match the longest
prefix; any match blocks). Rejected, each with a one-line reason naming the entry
(``blocked_ips[3]: not an IP address or prefix: "10.0.0.300"``):

- a prefix with host bits set (``"10.0.0.1/24"``): it is ambiguous (a typo in the
  address or in the length?) and a firewall must not guess, so it is refused with
  the network it would have meant as a hint, never silently normalised;
- an IPv6 zone (``"fe80::1%eth0"``): the program sees no zones;
- an IPv4-mapped IPv6 address (``"::ffff:10.0.0.5"``): never a source on the wire;
  write the IPv4 address.

The normal form is two sets of networks, one per family (:class:`BlockedPrefixes`);
each must fit its map (``max_entries``, the program's map size).

``rate_limit = { pps, burst }`` (:class:`RateLimit`): per source, ``pps`` packets a
second (0: off) with ``burst`` back-to-back packets (0: one second's worth, ``pps``).

Changing it: by difference
--------------------------
:func:`plan_update` turns (what a map holds, what it should hold) into ordered
steps. Rule: **insert before delete**, so an address blocked before and after the
change is blocked at every instant in between (the map is never cleared and
refilled). Only when the old and new sets together do not fit the map does the
plan make room first, deleting removed prefixes that overlap none of the pending
inserts (safe: no address that stays blocked depends on them); if that is still not
enough, the rest is deleted before the last inserts and the plan says it is not
``gapless``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, TypeAlias

import msgspec

from pipeline.errors import ConfigError

__all__ = [
    "AF_INET",
    "AF_INET6",
    "BlockedPrefixes",
    "Network",
    "PolicyChange",
    "RateLimit",
    "UpdatePlan",
    "UpdateStep",
    "event_address",
    "parse_blocked_ips",
    "parse_prefix",
    "plan_changes",
    "plan_update",
]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

AF_INET, AF_INET6 = 2, 10
"""The drop event's ``family`` (enum xdp_addr_family in xdp_firewall.h: the values of
``socket.AF_INET``/``AF_INET6`` on Linux)."""

_U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]


class RateLimit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``rate_limit = { pps = 0, burst = 0 }``: GCRA per source address (an IPv6 source's /64)."""

    pps: _U32 = 0
    """Packets per second per source; 0: no limit."""
    burst: _U32 = 0
    """Packets a source may send back to back; 0: one second's worth (``pps``)."""

    @property
    def enabled(self) -> bool:
        return self.pps > 0

    @property
    def effective_burst(self) -> int:
        """What the kernel is given: ``burst``, or ``pps`` when 0 (at least 1)."""
        return self.burst or max(1, self.pps)


@dataclass(frozen=True, slots=True)
class BlockedPrefixes:
    """``blocked_ips`` normalised: distinct networks per family."""

    v4: frozenset[ipaddress.IPv4Network] = frozenset()
    v6: frozenset[ipaddress.IPv6Network] = frozenset()

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def blocks(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether the policy blocks ``address`` (the kernel's answer, computed here)."""
        addr = ipaddress.ip_address(address)
        nets: Iterable[Network] = self.v4 if addr.version == 4 else self.v6
        return any(addr in net for net in nets)


def parse_prefix(text: str) -> Network:
    """One ``blocked_ips`` entry as a network; ``ValueError`` with the one-line problem."""
    shown = json.dumps(text)
    if "%" in text:
        raise ValueError(f"{shown} has an IPv6 zone: the firewall sees no zones, remove it")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or prefix: {shown}") from None
    address = text.split("/", 1)[0]
    if ipaddress.ip_address(address) != network.network_address:
        raise ValueError(
            f"{shown} has host bits set: write {json.dumps(str(network))} for the network"
            f" or {json.dumps(address)} for the one address"
        )
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
        raise ValueError(
            f"{shown} is an IPv4-mapped IPv6 address, never a source on the wire: "
            f"write {json.dumps(str(network.network_address.ipv4_mapped))}"
        )
    return network


def parse_blocked_ips(
    values: Sequence[str], *, max_entries: int | None = None, path: str = "blocked_ips"
) -> BlockedPrefixes:
    """Validate and normalise ``blocked_ips``; ``ConfigError`` paths are ``<path>[i]``
    (one entry) or ``<path>`` (too many for a map of ``max_entries``)."""
    v4: set[ipaddress.IPv4Network] = set()
    v6: set[ipaddress.IPv6Network] = set()
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(f"{path}[{index}]", f"expected a string, got {type(value).__name__}")
        try:
            network = parse_prefix(value)
        except ValueError as exc:
            raise ConfigError(f"{path}[{index}]", str(exc)) from None
        if isinstance(network, ipaddress.IPv4Network):
            v4.add(network)
        else:
            v6.add(network)
    if max_entries is not None:
        for family, nets in (("IPv4", v4), ("IPv6", v6)):
            if len(nets) > max_entries:
                raise ConfigError(
                    path,
                    f"{len(nets)} distinct {family} prefixes, more than the map holds ({max_entries}): "
                    "list fewer (a covering prefix instead of its addresses) or raise map_size",
                )
    return BlockedPrefixes(frozenset(v4), frozenset(v6))


# -- changing a map by difference ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdateStep:
    op: Literal["insert", "delete"]
    networks: tuple[Network, ...]


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    steps: tuple[UpdateStep, ...]
    gapless: bool
    """True: every address blocked before and after is blocked throughout (see the module docstring)."""

    @property
    def inserted(self) -> tuple[Network, ...]:
        return tuple(n for s in self.steps if s.op == "insert" for n in s.networks)

    @property
    def deleted(self) -> tuple[Network, ...]:
        return tuple(n for s in self.steps if s.op == "delete" for n in s.networks)


def _supernets(network: Network) -> set[Network]:
    return {network.supernet(new_prefix=length) for length in range(network.prefixlen + 1)}


def _overlapping(removed: Iterable[Network], pending: set[Network]) -> set[Network]:
    """The removed networks that contain, or lie inside, a pending one."""
    around_pending: set[Network] = set()
    for network in pending:
        around_pending |= _supernets(network)
    lengths = {network.prefixlen for network in pending}
    out = set()
    for network in removed:
        inside = any(
            network.supernet(new_prefix=length) in pending
            for length in lengths
            if length <= network.prefixlen
        )
        if inside or network in around_pending:
            out.add(network)
    return out


def plan_update(current: Iterable[Network], target: Iterable[Network], capacity: int) -> UpdatePlan:
    """Steps that turn a map holding ``current`` into one holding ``target`` (one
    family), never holding more than ``capacity`` entries (see the module docstring)."""
    have, want = set(current), set(target)
    return plan_changes(want - have, have - want, current_size=len(have), capacity=capacity)


def plan_changes(
    added: Iterable[Network], removed: Iterable[Network], *, current_size: int, capacity: int
) -> UpdatePlan:
    """:func:`plan_update` from the difference alone: ``added`` (not in the map),
    ``removed`` (in it), the map's entry count now and its capacity."""
    added, removed = sorted(added, key=_order), sorted(removed, key=_order)
    target_size = current_size + len(added) - len(removed)
    if target_size > capacity:
        raise ValueError(f"{target_size} prefixes do not fit a map of {capacity}")
    steps: list[UpdateStep] = []

    def step(op: Literal["insert", "delete"], networks: Iterable[Network]) -> None:
        networks = tuple(networks)
        if networks:
            steps.append(UpdateStep(op, networks))

    room = max(0, capacity - current_size)
    step("insert", added[:room])
    pending = added[room:]
    if not pending:
        step("delete", removed)
        return UpdatePlan(tuple(steps), gapless=True)
    # A full map: make room by deleting removed prefixes that no pending insert
    # overlaps, insert what then fits, and repeat while that frees anything.
    waiting = removed
    while pending:
        unsafe = _overlapping(waiting, set(pending))
        safe = [n for n in waiting if n not in unsafe]
        if not safe:
            break
        step("delete", safe)
        waiting = [n for n in waiting if n in unsafe]
        step("insert", pending[: len(safe)])
        pending = pending[len(safe) :]
    step("delete", waiting)
    step("insert", pending)
    return UpdatePlan(tuple(steps), gapless=not pending)


def _order(network: Network) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """What :meth:`bpf.programs.XdpFirewallProgram.apply_policy` changed."""

    added: tuple[Network, ...] = ()
    """Prefixes inserted (IPv4 first), in the order they were."""
    removed: tuple[Network, ...] = ()
    """Prefixes deleted."""
    rate_limit: tuple[RateLimit, RateLimit] | None = None
    """(before, after) when the rate limit changed."""
    gapless: bool = True
    """False only when a map too full for insert-before-delete forced a delete first."""

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rate_limit)

    def summary(self) -> str:
        """One line for the log: ``+2 -1 prefixes, rate_limit 0->100 pps``."""
        parts = [f"+{len(self.added)} -{len(self.removed)} prefixes"]
        if self.rate_limit is not None:
            before, after = self.rate_limit
            was, now = (
                f"{before.pps} pps/{before.effective_burst}",
                f"{after.pps} pps/{after.effective_burst}",
            )
            parts.append(f"rate_limit {was} -> {now}")
        if not self.gapless:
            parts.append("map full: some removals preceded insertions")
        return ", ".join(parts)


def event_address(
    family: int, v4: int, v6: bytes | Sequence[int]
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of a drop event: ``event_address(e["family"], e["saddr"], e["saddr6"])``."""
    if family == AF_INET:
        return ipaddress.IPv4Address(int(v4))
    if family == AF_INET6:
        return ipaddress.IPv6Address(bytes(bytearray(v6)))
    raise ValueError(f"unknown address family {family}")
