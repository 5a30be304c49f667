"""A stale XDP attachment (issue 13): after a SIGKILL the next run replaces bpfpipe's
own program, with one warning, and never anyone else's.

Everything happens on a veth pair into a namespace this test creates (see
_xdp_agent.py); the ``finally`` blocks kill what is left, detach XDP in every mode
and delete the veth and the namespace.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from _running_agent import RunningAgent
from _xdp_agent import firewall_config, left_attached_by_sigkill, xdp_prog_ids

pytestmark = pytest.mark.bpf

REPLACING = 'msg="replacing stale XDP program"'


def started_or_exited(run: RunningAgent, timeout_s: float = 60) -> bool:
    """True once the pipeline has started, False once the process has exited."""
    try:
        run.wait_started(timeout_s)
    except AssertionError:
        if run.proc.poll() is None:
            raise
        return False
    return True


def test_after_sigkill_the_next_run_replaces_its_own_stale_program(tmp_path: Path, unique_name: str) -> None:
    with firewall_config(tmp_path, unique_name) as (net, config):
        first_id = left_attached_by_sigkill(config, net.host_if)
        second = RunningAgent("--config", str(config))
        try:
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

            run = RunningAgent("--config", str(config))
            try:
                assert not started_or_exited(run), f"started over a foreign program: {run.stderr}"
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
