"""sd_notify (pipeline._notify): addresses, the watchdog rule, datagrams on a real socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pipeline._notify import Notifier, notify_address, watchdog_interval_s


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_addresses() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@bpfpipe/x"}) == b"\0bpfpipe/x"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_rule(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(environ, 4242) == expected


def test_without_a_socket_nothing_is_sent() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert notifier.ready() is False and notifier.stopping() is False and notifier.status("x") is False
    assert (notifier.sent, notifier.failed) == (0, 0)


def test_messages_arrive_as_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert notifier.status("load programs\ndone")
        assert notifier.ready("running")
        assert notifier.stopping()
        received = [sock.recv(4096).decode() for _ in range(3)]
    finally:
        notifier.close()
    assert received == ["STATUS=load programs done", "READY=1\nSTATUS=running", "STOPPING=1"]
    assert notifier.sent == 3


def test_abstract_socket() -> None:
    name = f"bpfpipe-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
    try:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        notifier.close()
        sock.close()


def test_a_supervisor_that_went_away_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert (notifier.sent, notifier.failed) == (0, 1)
    notifier.close()


def test_watchdog_pings_every_half_period(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == pytest.approx(0.1)

    async def main() -> None:
        # An autojumping clock: the pings are counted against trio's virtual time.
        with trio.move_on_after(0.35):
            await notifier.run_watchdog()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    pings = []
    while True:
        try:
            pings.append(sock.recv(64))
        except BlockingIOError:
            break
    notifier.close()
    assert pings == [b"WATCHDOG=1"] * 4  # at 0, 0.1, 0.2 and 0.3 s


def test_watchdog_off_returns_at_once(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    trio.run(notifier.run_watchdog)
    assert notifier.sent == 0
    notifier.close()
