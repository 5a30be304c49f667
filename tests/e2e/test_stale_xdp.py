"""A stale XDP attachment (issue 13): after a SIGKILL the next run replaces bpfpipe's
own program, with one warning, and never anyone else's.

Everything happens on a veth pair into a namespace this test creates (see
integration/_netns.py); the ``finally`` blocks kill what is left, detach XDP in
every mode and delete the veth and the namespace.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _cli import spawn
from integration._netns import VethNetns, interface_exists, netns_exists, veth_netns

pytestmark = pytest.mark.bpf

STARTED = 'msg="pipeline started"'
REPLACING = 'msg="replacing stale XDP program"'


class Running:
    """A spawned ``bpfpipe run`` whose stderr is collected line by line as it comes."""

    def __init__(self, config: Path) -> None:
        self.proc = spawn("run", "--config", str(config))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def started_or_exited(self, timeout_s: float = 60) -> bool:
        """True once the pipeline has started, False once the process has exited."""
        deadline = time.monotonic() + timeout_s
        while not any(STARTED in line for line in self.lines):
            if self.proc.poll() is not None and not self._reader.is_alive():
                return False
            assert time.monotonic() < deadline, f"neither started nor exited in {timeout_s} s: {self.stderr}"
            time.sleep(0.05)
        return True

    def wait_started(self) -> None:
        assert self.started_or_exited(), self.stderr

    def finish(self, timeout_s: float = 30) -> str:
        self.proc.wait(timeout=timeout_s)
        self._close()
        return self.stderr

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close()


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


def test_after_sigkill_the_next_run_replaces_its_own_stale_program(tmp_path: Path, unique_name: str) -> None:
    with firewall_config(tmp_path, unique_name) as (net, config):
        first = Running(config)
        second: Running | None = None
        try:
            first.wait_started()
            (first_id,) = xdp_prog_ids(net.host_if)
            first.proc.send_signal(signal.SIGKILL)
            first.finish()
            assert xdp_prog_ids(net.host_if) == [first_id], "SIGKILL detached the program?"

            second = Running(config)
            second.wait_started()
            warnings = [line for line in second.lines if "level=warn" in line]
            assert len(warnings) == 1, second.stderr
            assert REPLACING in warnings[0], warnings[0]
            assert f"interface={net.host_if}" in warnings[0], warnings[0]
            assert f"prog_id={first_id}" in warnings[0], warnings[0]
            assert "why_ours=" in warnings[0] and "tag" in warnings[0], warnings[0]
            (second_id,) = xdp_prog_ids(net.host_if)
            assert second_id != first_id

            second.proc.send_signal(signal.SIGINT)
            stderr = second.finish()
            assert second.proc.returncode == 0, stderr
            assert "Traceback" not in stderr, stderr
            assert xdp_prog_ids(net.host_if) == []
        finally:
            first.kill()
            if second is not None:
                second.kill()


FOREIGN = b"int foreign(struct xdp_md *ctx) { return XDP_PASS; }"


def test_a_foreign_program_is_never_replaced(tmp_path: Path, unique_name: str) -> None:
    from bcc import BPF

    with firewall_config(tmp_path, unique_name) as (net, config):
        foreign = BPF(text=FOREIGN)
        try:
            fn = foreign.load_func(b"foreign", BPF.XDP)
            BPF.attach_xdp(net.host_if.encode(), fn, BPF.XDP_FLAGS_SKB_MODE)
            (foreign_id,) = xdp_prog_ids(net.host_if)

            run = Running(config)
            try:
                assert not run.started_or_exited(), f"started over a foreign program: {run.stderr}"
                stderr = run.finish()
            finally:
                run.kill()
            assert run.proc.returncode == 3, stderr
            errors = [line for line in stderr.splitlines() if line.startswith("bpfpipe: error:")]
            assert len(errors) == 1, stderr
            assert f"prog id {foreign_id}, name 'foreign'" in errors[0], errors[0]
            assert f"ip link set dev {net.host_if} xdpgeneric off" in errors[0], errors[0]
            assert REPLACING not in stderr and "Traceback" not in stderr, stderr
            assert xdp_prog_ids(net.host_if) == [foreign_id]
        finally:
            BPF.remove_xdp(net.host_if.encode(), BPF.XDP_FLAGS_SKB_MODE)
            foreign.cleanup()
        assert xdp_prog_ids(net.host_if) == []
