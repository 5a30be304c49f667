"""The lifecycle's pieces without a process (pipeline._lifecycle): which step failed,
step lines to the log and to the supervisor, the late shutdown steps in order."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pipeline._agent import build_agent
from pipeline._lifecycle import SHUTDOWN_STEPS, STARTUP_STEPS, Shutdown, StepLog, failing_step, log_step
from pipeline._notify import Notifier
from pipeline.config import decode_config


def test_failing_step_is_the_one_after_the_last_done() -> None:
    assert failing_step([]) == "load config"
    assert failing_step(["load config", "initialise metrics"]) == "load programs"
    assert failing_step(["load config", "initialise metrics", "load programs", "create maps"]) == "attach"
    assert failing_step(list(STARTUP_STEPS)) == "mark ready"  # never past the last


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, Notifier]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "n.sock"))
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
    try:
        yield sock, notifier
    finally:
        notifier.close()
        sock.close()


def _received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.parametrize("level", ["info", "warning"])
def test_steps_reach_the_log_at_its_level_and_the_supervisor_always(
    notify: tuple[socket.socket, Notifier], level: str
) -> None:
    sock, notifier = notify
    agent_log = logging.getLogger("bpfpipe")
    saved = (agent_log.level, agent_log.handlers[:], agent_log.propagate)
    records = _Records()
    agent_log.handlers[:] = [records]
    agent_log.setLevel(level.upper())
    steps = StepLog(notifier)
    steps.install()
    try:
        log_step("startup", "load config", 0.0012)
        logging.getLogger("bpfpipe.steps").info("startup: attach", extra={"step": "attach"})
    finally:
        steps.uninstall()
        agent_log.level, agent_log.handlers[:], agent_log.propagate = saved
    assert steps.done == ["load config", "attach"]
    assert set(steps.finished_at) == {"load config", "attach"}
    assert _received(sock) == ["STATUS=startup: load config", "STATUS=startup: attach"]
    assert records.messages == (["startup: load config", "startup: attach"] if level == "info" else [])


class _Owner:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def defer_program_shutdown(self) -> None:
        self.calls.append("defer")

    async def detach_programs(self, *, wait_s: float) -> tuple[int, int]:
        self.calls.append(f"detach wait_s={wait_s}")
        return 1, 7

    def close_maps(self) -> int:
        self.calls.append("close maps")
        return 2

    def unload_programs(self) -> int:
        self.calls.append("unload")
        return 1


def _agent(tmp_path: Path, snapshot: str) -> Shutdown:
    config = decode_config(
        {
            "source": {"use": "synthetic", "config": {"total_events": 10}},
            "sink": {"use": "null"},
            "shutdown": {"metrics_snapshot_file": snapshot},
        }
    )
    return Shutdown(build_agent(config), Notifier({}))


def test_late_steps_run_in_the_seeds_order_and_write_the_snapshot(tmp_path: Path) -> None:
    snapshot = tmp_path / "final.prom"
    shutdown = _agent(tmp_path, str(snapshot))
    calls: list[str] = []
    shutdown.owners = [_Owner(calls)]
    steps = StepLog(Notifier({}))
    steps.install()
    try:
        trio.run(shutdown.finish)
        trio.run(shutdown.finish)  # once only
    finally:
        steps.uninstall()
    assert calls == ["detach wait_s=2.0", "close maps", "unload"]
    assert steps.done == list(SHUTDOWN_STEPS[3:])
    assert snapshot.read_text().strip(), "the exporter's text was written"
    assert not list(tmp_path.glob("final.prom.tmp-*"))


def test_a_startup_that_loaded_nothing_stays_quiet(tmp_path: Path) -> None:
    shutdown = _agent(tmp_path, str(tmp_path / "never.prom"))
    calls: list[str] = []

    class Idle(_Owner):
        async def detach_programs(self, *, wait_s: float) -> tuple[int, int]:
            self.calls.append(f"detach wait_s={wait_s}")
            return 0, 0

    shutdown.owners = [Idle(calls)]
    steps = StepLog(Notifier({}))
    steps.install()
    try:
        trio.run(lambda: shutdown.finish(quiet_if_idle=True))
    finally:
        steps.uninstall()
    assert calls == ["detach wait_s=0.0", "close maps", "unload"]
    assert steps.done == []
    assert not (tmp_path / "never.prom").exists()


def test_an_unwritable_snapshot_is_one_warning_not_a_crash(tmp_path: Path) -> None:
    shutdown = _agent(tmp_path, str(tmp_path / "missing-dir" / "final.prom"))
    records = _Records()
    steps_log = logging.getLogger("bpfpipe.steps")
    steps_log.addHandler(records)
    try:
        trio.run(shutdown.finish)
    finally:
        steps_log.removeHandler(records)
    warnings = [m for m in records.messages if "cannot write" in m]
    assert len(warnings) == 1 and "missing-dir" in warnings[0], records.messages
