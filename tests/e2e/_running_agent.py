"""A spawned ``bpfpipe run`` to talk to while it runs: its log lines as they come, and
JSON over HTTP to its servers on loopback (every e2e test that keeps an agent running).

Each test that starts one also ends it: ``stop`` (a signal of the test's choosing,
then wait) or ``kill`` in a ``finally`` block, so no agent outlives its test.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from signal import SIGTERM
from typing import Any

from _cli import spawn

STARTED = 'msg="pipeline started"'


class RunningAgent:
    """``spawn("run", ...)`` with a thread collecting stderr line by line.

    ``health_port``, ``admin_port`` and ``metrics_port`` (e.g. ``free_port()``) turn those
    servers on, over ``env``; 0 leaves them to ``env`` (off unless it says otherwise)."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str | None] | None = None,
        health_port: int = 0,
        admin_port: int = 0,
        metrics_port: int = 0,
    ) -> None:
        self.health_port, self.admin_port, self.metrics_port = health_port, admin_port, metrics_port
        ports = {"HEALTH_CHECK_PORT": health_port, "ADMIN_PORT": admin_port, "METRICS_PORT": metrics_port}
        env = {**(env or {}), **{name: str(port) for name, port in ports.items() if port}}
        self.proc = spawn("run", *args, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def matching(self, pattern: str) -> list[str]:
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 30) -> list[str]:
        """The log lines matching ``pattern``, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(pattern)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                self._reader.join(5)
                found = self.matching(pattern)
                if len(found) >= count:
                    return found
                raise AssertionError(f"bpfpipe exited ({self.proc.returncode}) first:\n{self.stderr}")
            time.sleep(0.02)
        raise AssertionError(f"no {count} line(s) matching {pattern!r} in {timeout} s:\n{self.stderr}")

    def wait_started(self, timeout: float = 60) -> None:
        """Until the pipeline has started (fails if bpfpipe exits first)."""
        self.wait_for(STARTED, timeout=timeout)

    def get_health(self, path: str) -> tuple[int, Any]:
        """(status, JSON) of a GET of ``path`` from the health server."""
        return http("GET", self.health_port, path, timeout=10)

    def status(self) -> dict[str, Any]:
        """The health server's ``/status`` document."""
        code, body = self.get_health("/status")
        assert code == 200, body
        return dict(body)

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda doc: True, timeout: float = 60
    ) -> dict[str, Any]:
        """The first ``/status`` document of a running pipeline for which ``predicate`` holds."""
        return dict(
            self._poll_health("/status", lambda doc: doc["state"] == "running" and predicate(doc), timeout)
        )

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        """The first 200 from ``/health/ready`` after the pipeline has started."""
        self.wait_started(timeout)
        return dict(self._poll_health("/health/ready", lambda body: True, timeout))

    def _poll_health(self, path: str, accept: Callable[[Any], bool], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        body: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"bpfpipe exited ({self.proc.returncode}):\n{self.stderr}"
            try:
                code, body = self.get_health(path)
            except OSError:  # not listening yet
                code = None
            if code == 200 and accept(body):
                return body
            time.sleep(0.1)
        raise AssertionError(f"no such {path} in {timeout} s (last: {body}); bpfpipe said:\n{self.stderr}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return code

    def finish(self, timeout: float = 30) -> str:
        """Wait for bpfpipe to exit (signalled, or on its own); its whole stderr."""
        self.wait(timeout)
        return self.stderr

    def stop(self, timeout: float = 60, *, signum: int = SIGTERM) -> int:
        """``signum`` and wait; kills it if it does not stop in time (and fails then)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL if it still runs, and reap it: for ``finally`` blocks."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)


def http(
    method: str,
    port: int,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    data: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """(status, parsed JSON body or the text) of one request to ``127.0.0.1:port``."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def wait_http(port: int, path: str, *, token: str | None = None, timeout: float = 30) -> Any:
    """The JSON of a 200 from ``path`` once the server answers (it binds before it serves)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = http("GET", port, path, token=token, timeout=5)
            if status == 200:
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no 200 from :{port}{path} in {timeout} s")
        time.sleep(0.05)


def log_field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\"(?:[^\"\\]|\\.)*\"|\S+)", line)
    assert match is not None, f"no {name}= in {line}"
    return match.group(1).strip('"')
