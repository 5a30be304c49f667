"""``bpfpipe diag``, ``top`` and ``tap`` against a ``bpfpipe run`` started as a user starts it.

The agent's health and admin servers listen on loopback ports the kernel picked free;
every agent a test starts is stopped by it (SIGINT, then its ledger must balance).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pexpect
import pytest
from _cli import BPFPIPE, CLEAN_ENV, assert_accounts_balance, assert_one_line_error, bpfpipe, free_port
from _running_agent import RunningAgent

SYNTHETIC = """\
[source]
use = "synthetic"
[source.config]
rate_per_s = 2000
batch_size = 100
[sink]
use = "null"
"""


def stop(agent: RunningAgent) -> str:
    """SIGINT, wait, and the whole stderr (with the final accounting line)."""
    agent.stop(30, signum=signal.SIGINT)
    return agent.stderr


@contextmanager
def running(tmp_path: Path, config_text: str) -> Iterator[RunningAgent]:
    config = tmp_path / "agent.toml"
    config.write_text(config_text)
    agent = RunningAgent("--config", str(config), health_port=free_port(), admin_port=free_port())
    try:
        yield agent
    finally:
        stop(agent)


def sections(report: str) -> dict[str, list[str]]:
    """The diag report by section: {"Programs": [lines...], ...}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in report.splitlines():
        match = re.match(r"^(\w+)(?: \(.*\))?:$", line)
        if match:
            current = match.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line.strip())
    return out


def diag_until(
    agent: RunningAgent, predicate: Any, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        proc = bpfpipe("diag", "--port", str(agent.health_port))
        if predicate(proc) or time.monotonic() > deadline:
            return proc
        time.sleep(0.5)


def events_per_s(report: str) -> float | None:
    match = re.search(r"Events/s: ([\d,.]+)", report)
    return float(match.group(1).replace(",", "")) if match else None


def test_diag_reports_every_section_of_a_synthetic_agent(tmp_path: Path) -> None:
    with running(tmp_path, SYNTHETIC) as agent:
        agent.wait_status()
        proc = diag_until(agent, lambda p: (events_per_s(p.stdout) or 0) > 0)
        stderr = stop(agent)
    report = proc.stdout
    found = sections(report)
    assert list(found) == ["Programs", "Maps", "Performance", "Health"], report
    assert found["Programs"] == ["none (this pipeline loads no BPF program)"]
    assert found["Maps"] == ["none"]
    rate = events_per_s(report)
    assert rate is not None and 0 < rate < 100_000, report  # 2,000/s configured; a busy box is slower
    assert re.search(r"Drops/s: [\d,.]+$", report, re.M), report
    assert re.search(r"Average latency: [\d,.]+ µs$", report, re.M), report
    checks = [line for line in found["Health"] if not line.startswith("overall:")]
    assert checks and all(re.match(r"^\w+: (OK|FAILED)( \[CRITICAL\])?(: .*)?$", c) for c in checks), report
    healthy = "overall: HEALTHY" in found["Health"]
    assert proc.returncode == (0 if healthy else 1), report
    assert proc.stderr == ""
    assert_accounts_balance(stderr)


def test_diag_without_an_agent_is_one_line_and_exit_4() -> None:
    port = free_port()
    proc = bpfpipe("diag", "--port", str(port))
    assert_one_line_error(
        proc,
        4,
        f"no agent answering on 127.0.0.1:{port}: connection refused"
        " (is bpfpipe running? is health_check_port right?)",
    )
    assert proc.stdout == ""


def test_diag_with_the_health_server_off_in_the_config_says_so(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("health_check_port = 0\n")
    proc = bpfpipe("diag", "--config", str(config))
    assert_one_line_error(
        proc, 2, "health_check_port is 0 in the config (that server is off); pass the port to use"
    )


def test_tap_prints_count_events_and_the_ledger_still_balances(tmp_path: Path) -> None:
    with running(tmp_path, SYNTHETIC) as agent:
        agent.wait_status()
        proc = bpfpipe("tap", "synthetic", "--count", "5", "--admin-port", str(agent.admin_port))
        unknown = bpfpipe("tap", "nope", "--admin-port", str(agent.admin_port))
        doc = agent.status()
        stderr = stop(agent)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(events) == 5
    assert all(e["event"] == "synthetic" for e in events)
    assert all({"seq", "pid", "ts_ns", "time", "weight"} <= set(e) for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    assert proc.stderr.strip() == "bpfpipe: tap: 5 events from 'synthetic' (ended: count)"
    assert doc["taps"] == 0  # the tap unhooked itself
    assert_one_line_error(unknown, 2, "tap: no stage 'nope' (stages: synthetic, null)")
    fields = assert_accounts_balance(stderr)
    assert fields.get("outcome_stage_dropped", 0) == 0  # a tap never drops pipeline events


def test_tap_takes_the_admin_token_from_the_config_or_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    with running(tmp_path, f'admin_token_file = "{token}"\n{SYNTHETIC}') as agent:
        agent.wait_status()
        port = str(agent.admin_port)
        config = str(tmp_path / "agent.toml")
        by_config = bpfpipe("tap", "synthetic", "--count", "2", "--admin-port", port, "--config", config)
        refused = bpfpipe(
            "tap", "synthetic", "--count", "2", "--admin-port", port, "--token-file", str(wrong)
        )
        stderr = stop(agent)
    assert by_config.returncode == 0, by_config.stderr
    assert len(by_config.stdout.splitlines()) == 2
    assert_one_line_error(
        refused,
        2,
        f"admin API on 127.0.0.1:{port}: missing or wrong bearer token (see --token-file, admin_token_file)",
    )
    assert refused.stdout == ""
    assert_accounts_balance(stderr)


def test_top_shows_the_stages_and_quits_on_q(tmp_path: Path) -> None:
    with running(tmp_path, SYNTHETIC) as agent:
        agent.wait_status()
        top = pexpect.spawn(
            sys.executable,
            [*BPFPIPE[1:], "top", "--port", str(agent.health_port), "--interval", "0.5"],
            env=CLEAN_ENV,
            dimensions=(40, 140),
            encoding="utf-8",
            timeout=30,
        )
        try:
            for _ in range(3):  # three refreshes, each holding the stage names and the channel
                top.expect("stages")
                top.expect("synthetic")
                top.expect("null")
                top.expect("synthetic->null")
            top.send("q")
            top.expect(pexpect.EOF)
            leaving = top.before
        finally:
            top.close(force=True)
        assert top.exitstatus == 0, top.before
        assert "\x1b[?1049l" in leaving  # back from the alternate screen: the terminal is restored
        stderr = stop(agent)
    assert_accounts_balance(stderr)


def test_top_shows_an_agent_that_is_gone_and_keeps_trying() -> None:
    port = free_port()
    top = pexpect.spawn(
        sys.executable,
        [*BPFPIPE[1:], "top", "--port", str(port), "--interval", "0.2"],
        env=CLEAN_ENV,
        dimensions=(30, 140),
        encoding="utf-8",
        timeout=30,
    )
    try:
        for _ in range(2):
            top.expect("agent unreachable")
            top.expect("retrying")
        top.sendintr()  # Ctrl-C leaves as cleanly as q
        top.expect(pexpect.EOF)
    finally:
        top.close(force=True)
    assert top.exitstatus == 0


@pytest.mark.bpf
def test_diag_reports_a_loaded_exec_program_with_its_kernel_ids(tmp_path: Path) -> None:
    config = '[source]\nuse = "exec"\n[sink]\nuse = "null"\n'
    with running(tmp_path, config) as agent:
        agent.wait_status(lambda doc: bool(doc["programs"]))
        subprocess.run(["true"], check=True)  # an exec for the program to see
        proc = diag_until(agent, lambda p: "LOADED" in p.stdout and events_per_s(p.stdout) is not None)
        found = sections(proc.stdout)
        ids = [int(i) for i in re.findall(r"\(ID: (\d+)\)$", "\n".join(found.get("Programs", [])), re.M)]
        # Each id is a real kernel program, held open by the agent.
        shown = [
            subprocess.run(["bpftool", "prog", "show", "id", str(i)], capture_output=True, text=True)
            for i in ids
        ]
        stderr = stop(agent)
    assert found["Programs"][0].startswith("exec: LOADED (ID: "), proc.stdout
    assert ids and all(i > 0 for i in ids), proc.stdout
    assert all(p.returncode == 0 and "tracepoint" in p.stdout for p in shown), [p.stdout for p in shown]
    assert any("tracepoint:sched:" in line for line in found["Programs"]), proc.stdout
    maps = found["Maps"]
    assert any(re.match(r"^exec/\w+: [\d,]+ / [\d,]+ entries$", m) for m in maps), proc.stdout
    assert events_per_s(proc.stdout) is not None
    assert_accounts_balance(stderr)
