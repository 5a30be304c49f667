"""``bpfpipe run`` with the xdp_firewall source on a veth into a namespace the test
makes (see integration/_netns.py), and the XDP programs attached there as ``ip``
shows them: for the stale-attachment and lifecycle tests.

``firewall_config`` detaches XDP in every mode on the way out, and checks that the
veth and the namespace are gone; ``left_attached_by_sigkill`` kills what it starts.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _running_agent import RunningAgent
from integration._netns import VethNetns, interface_exists, netns_exists, veth_netns


def xdp_prog_ids(interface: str) -> list[int]:
    done = subprocess.run(["ip", "-j", "link", "show", "dev", interface], capture_output=True, text=True)
    ids = []
    for link in json.loads(done.stdout or "[]"):
        xdp = link.get("xdp") or {}
        for entry in xdp.get("attached") or ([xdp] if "prog" in xdp else []):
            ids.append(int(entry["prog"]["id"]))
    return ids


@contextmanager
def firewall_config(tmp_path: Path, name: str) -> Iterator[tuple[VethNetns, Path]]:
    """A veth pair and a config running xdp_firewall (skb mode) on its host side."""
    with veth_netns(name) as net:
        config = tmp_path / "c.toml"
        config.write_text(
            '[source]\nuse = "xdp_firewall"\n'
            f'config = {{ options = {{ interface = "{net.host_if}", mode = "skb" }} }}\n'
            '[sink]\nuse = "null"\n'
        )
        try:
            yield net, config
        finally:
            for word in ("xdpgeneric", "xdpdrv"):
                subprocess.run(["ip", "link", "set", "dev", net.host_if, word, "off"], capture_output=True)
    assert not interface_exists(net.host_if)
    assert not netns_exists(net.netns)


def left_attached_by_sigkill(config: Path, interface: str) -> int:
    """Runs ``config`` until its pipeline starts, then SIGKILLs it: the id of the XDP
    program it leaves attached to ``interface`` (a stale attachment)."""
    first = RunningAgent("--config", str(config))
    try:
        first.wait_started()
        (first_id,) = xdp_prog_ids(interface)
        first.signal(signal.SIGKILL)
        first.finish()
    finally:
        first.kill()
    assert xdp_prog_ids(interface) == [first_id], "SIGKILL detached the program?"
    return first_id
