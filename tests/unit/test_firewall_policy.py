"""The XDP firewall's policy without a kernel: parsing, the build-time errors (exact
text), planning a change by difference, and the source's ``reconfigure`` contract."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import socket
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpf.firewall_policy import (
    AF_INET,
    AF_INET6,
    BlockedPrefixes,
    PolicyChange,
    RateLimit,
    event_address,
    parse_blocked_ips,
    plan_update,
)
from bpf.layout import dtype_from_ctypes
from bpf.loader import BpfLoadError
from bpf.programs import PROGRAM_DIR, XdpFirewallProgram
from bpf.source import header_enum
from pipeline import Batch, InflightBudget, Ledger, StageContext
from pipeline._build import build_specs
from pipeline.config import decode_config
from pipeline.errors import ConfigError, StageLoadError
from stages.decoder import event_views
from stages.jsonl_sink import JsonLinesEncoder
from stages.programs import XdpFirewallConfig, XdpFirewallSource

net = ipaddress.ip_network


def build(source_config: dict[str, Any], **top: Any) -> XdpFirewallConfig:
    """The source's resolved config, as ``bpfpipe check`` builds it."""
    raw = {
        **top,
        "source": {"use": "xdp_firewall", "config": {"options": {"interface": "lo"}, **source_config}},
    }
    specs, _ = build_specs(decode_config(raw))
    config = specs[0].config
    assert isinstance(config, XdpFirewallConfig)
    return config


def build_error(source_config: dict[str, Any], **top: Any) -> str:
    with pytest.raises(StageLoadError) as caught:
        build(source_config, **top)
    assert caught.value.exit_code == 2
    return str(caught.value)


# -- parsing and the errors a user sees -------------------------------------------------


def test_the_issue_example_parses_into_prefixes_per_family() -> None:
    config = build({"blocked_ips": ["10.0.0.5", "192.168.0.0/16", "2001:db8::/32", "::1"]})
    assert config.blocked_ips == ["10.0.0.5", "192.168.0.0/16", "2001:db8::/32", "::1"]
    assert config.rate_limit == RateLimit(pps=0, burst=0)
    blocked = parse_blocked_ips(config.blocked_ips)
    assert blocked.v4 == {net("10.0.0.5/32"), net("192.168.0.0/16")}
    assert blocked.v6 == {net("2001:db8::/32"), net("::1/128")}
    assert blocked.blocks("192.168.44.1") and blocked.blocks("2001:db8:ffff::9") and blocked.blocks("::1")
    assert not blocked.blocks("192.169.0.1") and not blocked.blocks("2001:db9::1")
    assert not blocked.blocks("10.0.0.6")


def test_duplicates_and_overlaps_are_fine() -> None:
    blocked = parse_blocked_ips(["10.0.0.5", "10.0.0.5/32", "10.0.0.0/8", "2001:db8::1", "2001:db8::/32"])
    assert blocked.v4 == {net("10.0.0.5/32"), net("10.0.0.0/8")}
    assert len(blocked) == 4


def test_a_bad_entry_names_its_key_path_exactly() -> None:
    message = build_error({"blocked_ips": ["10.0.0.5", "192.168.0.0/16", "2001:db8::/32", "10.0.0.300"]})
    assert message == (
        "stage 'xdp_firewall': source.config.blocked_ips[3]: not an IP address or prefix: \"10.0.0.300\""
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("10.0.0.1/24", '"10.0.0.1/24" has host bits set: write "10.0.0.0/24" for the network or "10.0.0.1"'
         " for the one address"),
        ("2001:db8::1/32", '"2001:db8::1/32" has host bits set: write "2001:db8::/32" for the network or'
         ' "2001:db8::1" for the one address'),
        ("10.0.0.0/33", 'not an IP address or prefix: "10.0.0.0/33"'),
        ("", 'not an IP address or prefix: ""'),
        (" 10.0.0.5", 'not an IP address or prefix: " 10.0.0.5"'),
        ("example.com", 'not an IP address or prefix: "example.com"'),
        ("fe80::1%eth0", '"fe80::1%eth0" has an IPv6 zone: the firewall sees no zones, remove it'),
        ("::ffff:10.0.0.5", '"::ffff:10.0.0.5" is an IPv4-mapped IPv6 address, never a source on the wire:'
         ' write "10.0.0.5"'),
    ],
)  # fmt: skip
def test_rejected_entries(entry: str, problem: str) -> None:
    assert build_error({"blocked_ips": ["10.0.0.5", entry]}) == (
        f"stage 'xdp_firewall': source.config.blocked_ips[1]: {problem}"
    )


def test_a_non_string_entry_names_its_index() -> None:
    message = build_error({"blocked_ips": ["10.0.0.5", 167772165]})
    assert "source.config.blocked_ips[1]" in message
    assert message.startswith("stage 'xdp_firewall': ")


def test_the_count_is_bounded_by_the_map_size_per_family() -> None:
    v4 = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(128)]
    v6 = [str(ipaddress.IPv6Address(0x20010DB8 << 96 | i)) for i in range(128)]
    assert len(parse_blocked_ips(build({"blocked_ips": v4 + v6}, bpf_map_size=128).blocked_ips)) == 256
    message = build_error({"blocked_ips": [*v4, "10.1.0.0/16"]}, bpf_map_size=128)
    assert message == (
        "stage 'xdp_firewall': source.config.blocked_ips: 129 distinct IPv4 prefixes, more than the map "
        "holds (128): list fewer (a covering prefix instead of its addresses) or raise map_size"
    )
    # The source's own map_size wins over bpf_map_size, as it does for the program.
    assert build({"blocked_ips": [*v4, "10.1.0.0/16"], "map_size": 256}, bpf_map_size=128).map_size == 256
    # Duplicates do not count twice.
    assert build({"blocked_ips": v4 + v4}, bpf_map_size=128).blocked_ips == v4 + v4


def test_rate_limit_is_validated_with_key_paths() -> None:
    assert build({"rate_limit": {"pps": 100}}).rate_limit == RateLimit(pps=100, burst=0)
    assert "source.config.rate_limit.pps" in build_error({"rate_limit": {"pps": -1}})
    assert "source.config.rate_limit.pps" in build_error({"rate_limit": {"pps": 1 << 32}})
    assert "source.config.rate_limit.rate" in build_error({"rate_limit": {"rate": 5}})
    assert RateLimit(pps=100).effective_burst == 100
    assert RateLimit(pps=100, burst=7).effective_burst == 7
    assert RateLimit().effective_burst == 1 and not RateLimit().enabled


def test_parse_blocked_ips_paths_without_the_stage() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_blocked_ips(["::1", "nope"])
    assert caught.value.path == "blocked_ips[1]"


# -- planning a change by difference ------------------------------------------------------


def test_inserts_come_before_deletes() -> None:
    plan = plan_update({net("10.0.0.0/24")}, {net("10.0.0.0/16"), net("10.9.0.1/32")}, capacity=16)
    assert [(s.op, s.networks) for s in plan.steps] == [
        ("insert", (net("10.0.0.0/16"), net("10.9.0.1/32"))),
        ("delete", (net("10.0.0.0/24"),)),
    ]
    assert plan.gapless
    assert plan_update({net("10.0.0.0/24")}, {net("10.0.0.0/24")}, capacity=1).steps == ()


def test_a_full_map_deletes_unrelated_prefixes_first() -> None:
    # Capacity 2, holding A and B; the target is A' (inside B) and C. No room to insert
    # first; B must stay until A' is in, so A (related to nothing pending) goes first.
    a, b = net("10.1.0.0/16"), net("10.2.0.0/16")
    a2, c = net("10.2.3.0/24"), net("10.3.0.0/16")
    plan = plan_update({a, b}, {a2, c}, capacity=2)
    assert [(s.op, s.networks) for s in plan.steps] == [
        ("delete", (a,)),
        ("insert", (a2,)),
        ("delete", (b,)),
        ("insert", (c,)),
    ]
    assert plan.gapless


def test_a_plan_that_cannot_be_gapless_says_so() -> None:
    b, inside = net("10.2.0.0/16"), net("10.2.3.0/24")
    plan = plan_update({b}, {inside}, capacity=1)
    assert [(s.op, s.networks) for s in plan.steps] == [("delete", (b,)), ("insert", (inside,))]
    assert not plan.gapless
    with pytest.raises(ValueError, match="3 prefixes do not fit a map of 2"):
        plan_update(set(), {b, inside, net("10.3.0.0/16")}, capacity=2)


# Networks inside 10.0.0.0/28: 31 of them, small enough to check every address.
SMALL = [
    n for length in range(28, 33) for n in ipaddress.ip_network("10.0.0.0/28").subnets(new_prefix=length)
]
small_sets = st.sets(st.sampled_from(SMALL), max_size=8)


@given(current=small_sets, target=small_sets, spare=st.integers(0, 4))
def test_plans_keep_every_address_blocked_throughout(
    current: set[ipaddress.IPv4Network], target: set[ipaddress.IPv4Network], spare: int
) -> None:
    """Model: a map as a set with a capacity; after every single update, an address
    blocked before and after the change is blocked, and the map never overflows."""
    capacity = max(len(current), len(target)) + spare
    plan = plan_update(current, target, capacity)
    addresses = list(ipaddress.ip_network("10.0.0.0/28"))
    both = [a for a in addresses if any(a in n for n in current) and any(a in n for n in target)]
    state = set(current)
    leaks = 0
    for step in plan.steps:
        for network in step.networks:
            if step.op == "insert":
                assert network not in state
                state.add(network)
            else:
                state.remove(network)
            assert len(state) <= capacity
            leaks += sum(not any(a in n for n in state) for a in both)
    assert state == target
    assert set(plan.inserted) == target - current and set(plan.deleted) == current - target
    assert (leaks == 0) if plan.gapless else True
    if len(current | target) <= capacity:
        assert plan.gapless and leaks == 0


def test_policy_change_summary() -> None:
    change = PolicyChange(added=(net("10.0.0.0/8"),), rate_limit=(RateLimit(), RateLimit(pps=100)))
    assert change.changed
    assert change.summary() == "+1 -0 prefixes, rate_limit 0 pps/1 -> 100 pps/100"
    assert not PolicyChange().changed


# -- the drop event's addresses -------------------------------------------------------------


def test_address_family_values_match_the_header_and_the_socket_module() -> None:
    families = header_enum(PROGRAM_DIR / "xdp_firewall.h", "XDP_AF")
    assert families == {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
    assert (AF_INET, AF_INET6) == (socket.AF_INET, socket.AF_INET6)
    assert str(event_address(AF_INET, 0x0A000005, bytes(16))) == "10.0.0.5"
    v6 = ipaddress.IPv6Address("2001:db8::7")
    assert event_address(AF_INET6, 0, np.frombuffer(v6.packed, np.uint8)) == v6
    with pytest.raises(ValueError, match="unknown address family 7"):
        event_address(7, 0, bytes(16))


class _Hdr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint16), ("cpu", ctypes.c_uint16), ("rate", ctypes.c_uint32),
                ("ts_ns", ctypes.c_uint64)]  # fmt: skip


class bpfpipe_hdr(_Hdr):  # the C name: the flattening keys on it
    pass


class _Drop(ctypes.Structure):
    """struct xdp_drop_event as bcc describes it (to test the decoders without bcc)."""

    _fields_ = [
        ("hdr", bpfpipe_hdr), ("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16), ("protocol", ctypes.c_uint8),
        ("reason", ctypes.c_uint8), ("family", ctypes.c_uint8), ("__pad0", ctypes.c_uint8),
        ("pkt_len", ctypes.c_uint32), ("ifindex", ctypes.c_uint32),
        ("saddr6", ctypes.c_uint8 * 16), ("daddr6", ctypes.c_uint8 * 16),
    ]  # fmt: skip


def test_the_decoder_and_the_jsonl_encoder_carry_a_16_byte_address() -> None:
    dtype = dtype_from_ctypes(_Drop, "struct xdp_drop_event")
    assert dtype.itemsize == 72 and dtype["saddr6"].shape == (16,)
    events = np.zeros(2, dtype)
    source = ipaddress.IPv6Address("2001:db8::5")
    events[0]["family"], events[0]["saddr6"] = AF_INET6, np.frombuffer(source.packed, np.uint8)
    events[1]["family"], events[1]["saddr"] = AF_INET, int(ipaddress.IPv4Address("10.0.0.5"))
    batch = Batch(events, np.ones(2))
    views = event_views(batch, "xdp_drop")
    assert views[0].saddr6 == list(source.packed)  # type: ignore[attr-defined]
    encoder = JsonLinesEncoder(clock_offset_ns=0)
    lines = [json.loads(line) for line in encoder.encode(events, np.ones(2), "xdp_drop").splitlines()]
    assert lines[0]["saddr6"] == list(source.packed) and lines[1]["saddr6"] == [0] * 16
    addresses = [event_address(line["family"], line["saddr"], line["saddr6"]) for line in lines]
    assert [str(a) for a in addresses] == ["2001:db8::5", "10.0.0.5"]
    assert msgspec.json.decode(encoder.encode(events[:1], np.ones(1)))["saddr6"] == list(source.packed)


# -- the source's reconfigure, against a recording program ------------------------------------


class RecordingFirewall(XdpFirewallProgram):
    """An XdpFirewallProgram that records policies instead of writing maps."""

    def __init__(self) -> None:  # no bcc: nothing of LoadedProgram.__init__
        self.name = "xdp_firewall"
        self.map_size = 1024
        self.ring_size_bytes = 4096
        self.ring_wakeup = None
        self.applied: list[tuple[BlockedPrefixes, RateLimit | None]] = []

    def apply_policy(self, blocked_ips: Any, rate_limit: RateLimit | None = None) -> PolicyChange:
        assert isinstance(blocked_ips, BlockedPrefixes)
        self.applied.append((blocked_ips, rate_limit))
        return PolicyChange()


def make_source(**fields: Any) -> XdpFirewallSource:
    config = XdpFirewallConfig(options={"interface": "lo"}, **fields)
    return XdpFirewallSource(config, StageContext("xdp_firewall", "source", Ledger(), InflightBudget()))


def test_the_policy_is_applied_when_the_maps_are_prepared_and_live_after() -> None:
    source = make_source(blocked_ips=["10.0.0.5"], rate_limit=RateLimit(pps=10))
    program = RecordingFirewall()
    source._prepare_maps(program)
    assert program.applied == [(parse_blocked_ips(["10.0.0.5"]), RateLimit(pps=10))]
    new = msgspec.structs.replace(source.config, blocked_ips=["2001:db8::/32"], rate_limit=RateLimit())
    source.reconfigure(new)
    assert program.applied[-1] == (BlockedPrefixes(v6=frozenset({net("2001:db8::/32")})), RateLimit())
    assert source.config is new
    assert XdpFirewallSource.live_config_fields == {"blocked_ips", "rate_limit"}


class FailingFirewall(RecordingFirewall):
    def apply_policy(self, blocked_ips: Any, rate_limit: RateLimit | None = None) -> PolicyChange:
        raise RuntimeError("firewall policy not applied: inserting 10.0.0.5/32 failed: No space left")


def test_a_policy_that_cannot_be_written_at_load_is_a_load_error_naming_the_program() -> None:
    source = make_source(blocked_ips=["10.0.0.5"])
    with pytest.raises(BpfLoadError) as raised:
        source._prepare_maps(FailingFirewall())
    assert str(raised.value) == (
        "BPF program 'xdp_firewall' was not attached: "
        "firewall policy not applied: inserting 10.0.0.5/32 failed: No space left"
    )
    assert raised.value.exit_code == 3


def test_reconfigure_refuses_anything_but_the_policy() -> None:
    source = make_source(blocked_ips=["10.0.0.5"])
    program = RecordingFirewall()
    source._prepare_maps(program)
    changed = msgspec.structs.replace(
        source.config, blocked_ips=["10.0.0.6"], options={"interface": "eth9"}, map_size=4096
    )
    with pytest.raises(ValueError) as caught:
        source.reconfigure(changed)
    assert str(caught.value) == (
        "map_size, options cannot change while the source runs (only blocked_ips, rate_limit can): "
        "restart to apply"
    )
    assert len(program.applied) == 1 and source.config.blocked_ips == ["10.0.0.5"]


def test_reconfigure_before_the_program_loads_only_records_the_config() -> None:
    source = make_source(blocked_ips=["10.0.0.5"])
    new = msgspec.structs.replace(source.config, blocked_ips=["10.0.0.7"])
    source.reconfigure(new)
    program = RecordingFirewall()
    source._prepare_maps(program)
    assert program.applied == [(parse_blocked_ips(["10.0.0.7"]), RateLimit())]


def test_only_the_firewall_program_takes_a_policy() -> None:
    message = build_error({"program": "exec", "options": {}, "blocked_ips": ["10.0.0.5"]})
    assert (
        message
        == "stage 'xdp_firewall': source.config.program: only 'xdp_firewall' takes blocked_ips and rate_limit"
    )
