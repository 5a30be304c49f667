"""A running agent: the pipeline plus everything an operator talks to.

``build_agent(config)`` composes, in one place, what ``bpfpipe run`` runs:

* the :class:`~pipeline.Pipeline` (nodes, edges, ledger) with its helpers: the
  resource enforcer, the health monitor's heartbeat, the HTTP servers;
* :class:`~pipeline.metrics.MetricsExporter` — the Prometheus registry and ``/metrics``;
* :class:`~pipeline.health.HealthMonitor` — ``/health/live``, ``/health/ready``, heartbeats;
* :class:`~pipeline.status.StatusApi` — read-only ``/status`` (diag, top) and ``/admin/tap``;
* :class:`~pipeline.admin.AdminApi` — ``/admin/config`` (reload), behind the token;
* :class:`~pipeline.reload.Reloader` — live reload (SIGHUP and ``POST /admin/config``);
* :class:`AgentServers` — binds the three ports early and serves their routes;
* :class:`~pipeline.fleet.FleetAgent` — fleet policy from NATS, when ``fleet.servers`` is set.

``bpfpipe check`` builds only the pipeline (``build_pipeline``): nothing here binds
or reads anything outside the process until :meth:`AgentServers.bind` or ``run``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .config import Config
from .errors import ConfigError
from .http import Route, asgi_app, bearer_guard, bind, serve

if TYPE_CHECKING:
    from ._graph import Pipeline
    from .admin import AdminApi
    from .fleet import FleetAgent
    from .health import HealthMonitor
    from .metrics import MetricsExporter
    from .reload import Reloader
    from .status import StatusApi

__all__ = ["Agent", "AgentServers", "build_agent", "read_token"]

log = logging.getLogger("bpfpipe.agent")

RouteProvider = Callable[["Pipeline"], Iterable[Route]]
SERVERS = {
    # server: (port key, bind key)
    "metrics": ("metrics_port", "metrics_bind"),
    "health": ("health_check_port", "health_bind"),
    "admin": ("admin_port", "admin_bind"),
}

MAX_TOKEN_BYTES = 4096


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); ConfigError if
    the file cannot be read, is empty or is implausibly large."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError("admin_token_file", f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise ConfigError("admin_token_file", f"{path} is over {MAX_TOKEN_BYTES} bytes; is it the token?")
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise ConfigError("admin_token_file", f"{path} is empty")
    return token


@dataclass
class AgentServers:
    """The agent's HTTP servers; a server whose port is 0 is not started."""

    config: Config
    providers: dict[str, list[RouteProvider]] = field(default_factory=lambda: {k: [] for k in SERVERS})
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    """The port each running server listens on (after ``run`` has started it)."""
    token: str | None = None

    def add(self, server: str, provider: RouteProvider) -> None:
        self.providers[server].append(provider)

    def bind(self) -> None:
        """Claim every enabled server's port now (one line naming the key if one is
        busy) and read the admin token; idempotent."""
        config = self.config
        if config.admin_token_file and self.token is None:
            self.token = read_token(config.admin_token_file)
        for server, (port_key, bind_key) in SERVERS.items():
            port = getattr(config, port_key)
            if port and server not in self.sockets:
                self.sockets[server] = bind(getattr(config, bind_key), port, key=port_key)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A pipeline helper: serve every enabled server until cancelled."""
        self.bind()
        async with trio.open_nursery() as nursery:
            for server, sock in list(self.sockets.items()):
                routes = [route for provider in self.providers[server] for route in provider(pipe)]
                guard = None
                if server == "admin":
                    host = self.config.admin_bind
                    if self.token is None and not ipaddress.ip_address(host).is_loopback:
                        raise ConfigError("admin_bind", "refusing to expose the admin API without a token")
                    guard = bearer_guard(self.token)
                app = asgi_app(routes, guard=guard)
                del self.sockets[server]
                self.ports[server] = await nursery.start(_serve, app, sock, server)
            task_status.started()


async def _serve(
    app: Callable[..., object], sock: socket.socket, name: str, task_status: trio.TaskStatus[int]
) -> None:
    await serve(app, sock, name=name, task_status=task_status)  # type: ignore[arg-type]


@dataclass
class Agent:
    """What ``bpfpipe run`` runs; see the module docstring."""

    config: Config
    pipeline: Pipeline
    servers: AgentServers
    metrics: MetricsExporter
    health: HealthMonitor
    status: StatusApi
    admin: AdminApi
    reloader: Reloader
    fleet: FleetAgent | None = None


def build_agent(config: Config) -> Agent:
    """The pipeline of ``config`` with the exporters, health checks, status and admin
    APIs and their servers composed in. Nothing is bound or started yet."""
    from ._build import build_specs
    from ._enforcer import ResourceEnforcer
    from ._graph import Pipeline
    from .admin import AdminApi
    from .health import HealthMonitor
    from .metrics import MetricsExporter
    from .reload import Reloader
    from .status import StatusApi

    specs, capacities = build_specs(config)
    enforcer = ResourceEnforcer(config.limits)
    metrics = MetricsExporter(config, enforcer=enforcer)
    health = HealthMonitor(config)
    metrics.registry.register(health)  # bpfpipe_ready, bpfpipe_health_check_healthy
    status = StatusApi(config)
    reloader = Reloader(config, enforcer=enforcer, metrics=metrics, listeners=[health.update])
    metrics.reload_statistics = reloader.statistics
    admin = AdminApi(config, reloader)
    servers = AgentServers(config)
    servers.add("metrics", metrics.routes)
    servers.add("health", health.routes)
    servers.add("health", status.routes)
    servers.add("admin", status.admin_routes)
    servers.add("admin", admin.routes)
    helpers = [enforcer.run, health.run, status.run, servers.run]  # metrics: attached below
    fleet = None
    if config.fleet.servers:
        from .fleet import FleetAgent

        fleet = FleetAgent(config.fleet, reloader)
        helpers.append(fleet.run)
    pipe = Pipeline(specs, capacities, settings=config, helpers=helpers)
    metrics.attach(pipe)  # before any batch flows: its sink observer and process() timers
    reloader.bind(pipe)
    return Agent(config, pipe, servers, metrics, health, status, admin, reloader, fleet)
