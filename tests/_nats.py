"""Real NATS servers for the tests: Debian's ``nats-server`` (2.9, JetStream) on loopback.

``nats_cluster(tmp_path, n)`` starts one server (``n=1``) or an ``n``-server cluster (routes on
loopback, distinct ``server_name``s, JetStream on every server, one store directory each), waits
until every server answers ``/healthz`` on its monitoring port, and stops them all in a
``finally``: SIGTERM, then SIGKILL after a grace period. Each server keeps its ports and store
across ``stop()``/``start()``, so a restarted server rejoins as itself with its data.

    with nats_cluster(tmp_path, n=3) as cluster:
        cluster.servers[0].kill()      # the process dies, as on a crash
        cluster.servers[0].start()     # back with the same ports and store
        cluster.urls                   # ["nats://127.0.0.1:…", …]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _tools import require

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0
REJOIN_WAIT_S = 10.0


def require_nats() -> None:
    """Fail under CI (make setup installs it), skip elsewhere, when nats-server is missing."""
    require(
        shutil.which("nats-server") is not None or os.access(NATS_SERVER, os.X_OK),
        "nats-server is not installed",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One ``nats-server`` process with fixed ports and store; ``start``/``stop``/``kill``."""

    def __init__(self, directory: Path, name: str, cluster_name: str | None) -> None:
        self.directory = directory
        self.name = name
        self.cluster_name = cluster_name
        self.port = _free_port()
        self.monitor_port = _free_port()
        self.cluster_port = _free_port() if cluster_name else 0
        self.store_dir = directory / "store"
        self.config_file = directory / "nats.conf"
        self.log_file = directory / "nats.log"
        self.routes: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            # Small limits: tests never need more, and the host may be small.
            f'jetstream {{ store_dir: "{self.store_dir}", max_memory_store: 256MB, max_file_store: 2GB }}',
        ]
        if self.cluster_name:
            routes = ", ".join(self.routes)
            listen = f"127.0.0.1:{self.cluster_port}"
            lines.append(f"cluster {{ name: {self.cluster_name}, listen: {listen}, routes: [{routes}] }}")
        self.config_file.write_text("\n".join(lines) + "\n")

    def start(self, *, wait: bool = True) -> None:
        """Start (or restart) with the same ports and store; wait until it serves JetStream
        and, in a cluster, for up to ``REJOIN_WAIT_S`` more until it has caught up
        (plain ``/healthz``: meta leader known, its streams current). Without a quorum of
        the others running it never catches up; that wait then just ends."""
        if self.running:
            return
        self._write_config()
        log = self.log_file.open("ab")
        try:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.config_file)], stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        if wait:
            self.wait_ready()
            if self.cluster_name:
                deadline = time.monotonic() + REJOIN_WAIT_S
                while not self.healthy() and time.monotonic() < deadline:
                    time.sleep(0.1)

    def healthy(self, *, js_only: bool = False) -> bool:
        query = "?js-enabled-only=true" if js_only else ""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz{query}", timeout=2) as response:
                return bool(json.loads(response.read()).get("status") == "ok")
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, *, js_only: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy(js_only=js_only):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server {self.name} exited ({self.proc.returncode}); see {self.log_file}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {self.name} not ready in {timeout_s} s; see {self.log_file}")
            time.sleep(0.05)

    def monitor(self, endpoint: str) -> Any:
        """GET a monitoring endpoint (``"jsz?streams=true"``, ``"varz"``…) as JSON."""
        with urllib.request.urlopen(f"{self.monitor_url}/{endpoint}", timeout=5) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it is not gone within the grace period."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL: the server dies as on a crash."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()


class NatsCluster:
    def __init__(self, tmp_path: Path, n: int) -> None:
        cluster_name = f"bpfpipe-test-{os.getpid()}" if n > 1 else None
        self.servers = [NatsServer(tmp_path / f"nats-{i}", f"n{i}", cluster_name) for i in range(n)]
        for server in self.servers:
            server.routes = [f"nats-route://127.0.0.1:{other.cluster_port}" for other in self.servers]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start_all(self) -> None:
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            if server.running:
                server.wait_ready()
        if len(self.servers) > 1:
            # A cluster serves JetStream once it has a meta leader: plain /healthz says so.
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all(server.healthy() for server in self.servers):
                if time.monotonic() > deadline:
                    raise TimeoutError("nats cluster has no JetStream meta leader")
                time.sleep(0.1)

    def stop_all(self) -> None:
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.stop()

    def kill_all(self) -> None:
        for server in self.servers:
            server.kill()

    def server_named(self, name: str) -> NatsServer:
        return next(server for server in self.servers if server.name == name)

    def stream_leader(self, stream: str) -> NatsServer:
        """The server leading ``stream`` now (from ``/jsz`` of any running server)."""
        for server in self.servers:
            if not server.running:
                continue
            try:
                info = server.monitor("jsz?streams=true")
            except (OSError, ValueError):
                continue
            for account in info.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and leader:
                        return self.server_named(leader)
        raise LookupError(f"no leader for stream {stream!r}")


@contextmanager
def nats_cluster(tmp_path: Path, n: int = 1) -> Iterator[NatsCluster]:
    """``n`` servers started and ready; all stopped (SIGTERM, then SIGKILL) on the way out."""
    require_nats()
    cluster = NatsCluster(tmp_path, n)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()
