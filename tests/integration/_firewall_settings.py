"""The config of a pipeline running the xdp_firewall source on a test's veth, built
the way ``bpfpipe run`` builds it (for the tests that go through the runtime)."""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.testing import settings


def firewall_settings(interface: str, *, blocked_ips: list[str], rate_limit: dict[str, Any]) -> Config:
    """xdp_firewall in skb mode on ``interface`` (1,024-entry maps) into a null sink,
    with every HTTP server off."""
    return settings(
        metrics_port=0,
        health_check_port=0,
        admin_port=0,
        bpf_map_size=1024,
        source={
            "use": "xdp_firewall",
            "config": {
                "options": {"interface": interface, "mode": "skb"},
                "blocked_ips": blocked_ips,
                "rate_limit": rate_limit,
            },
        },
        sink={"use": "null"},
    )
