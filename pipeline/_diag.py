"""``bpfpipe diag``, ``top`` and ``tap``: clients of a running agent's HTTP servers.

* ``diag`` asks the health server on loopback (``health_check_port``; TCP, not a
  unix socket) for ``/status?maps=1`` and ``/health/ready`` and prints the report:
  Programs, Maps, Performance, Health. Exit 0 healthy, 1 unhealthy.
* ``top`` reads ``/status`` every ``--interval`` and shows it with rich on the
  terminal's alternate screen. ``q`` or Ctrl-C leaves (exit 0, terminal restored).
  An agent that stops answering is shown on the screen and asked again every
  interval, so ``top`` survives an agent restart.
* ``tap`` streams ``/admin/tap`` from the admin server: event lines to stdout,
  the tap's summary (events, copies it dropped) as one line on stderr.

No agent answering is one line and exit :data:`EXIT_NO_AGENT` (4). HTTP is the
standard library's ``urllib`` (no dependency for a client this small).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlencode

from .config import Config, load_config
from .errors import BpfpipeError

__all__ = ["EXIT_NO_AGENT", "EXIT_UNHEALTHY", "NoAgent", "cmd_diag", "cmd_tap", "cmd_top", "render_diag"]

EXIT_UNHEALTHY = 1
EXIT_NO_AGENT = 4


class NoAgent(BpfpipeError):
    """Nothing answered on the address (exit 4)."""

    exit_code = EXIT_NO_AGENT

    def __init__(self, address: str, key: str, why: str = "") -> None:
        detail = f": {why}" if why else ""
        super().__init__(f"no agent answering on {address}{detail} (is bpfpipe running? is {key} right?)")


class AgentError(BpfpipeError):
    """The agent answered, but not with what we asked for (exit 1)."""

    exit_code = 1


class UsageError(BpfpipeError):
    exit_code = 2


@dataclass(frozen=True, slots=True)
class Agent:
    host: str
    port: int
    key: str
    """The config key naming the port (for the error line)."""
    timeout_s: float
    token: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, path: str, **query: Any) -> str:
        return f"http://{self.address}{path}" + (f"?{urlencode(query)}" if query else "")

    def open(self, path: str, **query: Any) -> Any:
        """The response (any status: an HTTP error is a response too); NoAgent if nothing answers."""
        request = urllib.request.Request(self.url(path, **query))
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            return exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            why = getattr(reason, "strerror", None) or str(reason)
            raise NoAgent(self.address, self.key, why.lower()) from None

    def get_json(self, path: str, **query: Any) -> tuple[int, Any]:
        response = self.open(path, **query)
        with response:
            try:
                body = response.read()
            except (OSError, ValueError) as exc:
                raise NoAgent(self.address, self.key, f"connection broke: {exc}") from None
        try:
            return int(response.status), json.loads(body)
        except ValueError:
            raise AgentError(
                f"{self.address}{path} answered HTTP {response.status} with no JSON: is it a bpfpipe agent?"
            ) from None


def _config(path: str | None) -> Config:
    path = path or os.environ.get("BPFPIPE_CONFIG")
    return load_config(path, environ=os.environ)


def _connect_host(bind: str) -> str:
    """Where to reach a server bound to ``bind``: loopback for a wildcard bind."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        return "::1" if address.version == 6 and bind != "::" else "127.0.0.1"
    return bind


def _agent(
    args: argparse.Namespace,
    port_key: str,
    bind_key: str,
    host: str | None,
    port: int | None,
    timeout_s: float,
) -> Agent:
    """Where the agent's server is: flags first, then the config (read only if needed)."""
    token_file: str | None = getattr(args, "token_file", None)
    wants_token = port_key == "admin_port" and not token_file
    if port is None or host is None or wants_token:
        config = _config(args.config)
        if port is None:
            port = int(getattr(config, port_key))
            if port == 0:
                raise UsageError(f"{port_key} is 0 in the config (that server is off); pass the port to use")
        if host is None:
            host = _connect_host(getattr(config, bind_key))
        if wants_token:
            token_file = config.admin_token_file
    if not 0 < port < 65536:
        raise UsageError(f"port must be in 1..65535, got {port}")
    token = None
    if port_key == "admin_port" and token_file:
        from ._agent import read_token

        token = read_token(token_file)
    return Agent(host, port, port_key, timeout_s, token)


# -- diag --------------------------------------------------------------------------------


def _number(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render_diag(status: dict[str, Any], health: dict[str, Any] | None, health_note: str = "") -> str:
    """The report ``bpfpipe diag`` prints, from ``/status`` and ``/health/ready``."""
    lines = [f"bpfpipe {status.get('version', '?')} — up {_number(status.get('uptime_s'))} s"]
    lines.append("Programs:")
    programs = status.get("programs") or []
    for p in programs:
        ids = ", ".join(str(i) for i in p.get("ids", [])) or "-"
        lines.append(f"  {p['name']}: {p['state']} (ID: {ids})")
        for a in p.get("attachments", []):
            lines.append(f"    {a['function']} -> {a['attach_point']} (ID: {a['prog_id']})")
    if not programs:
        lines.append("  none (this pipeline loads no BPF program)")
    lines.append("Maps:")
    maps = status.get("maps") or []
    for m in maps:
        if "error" in m:
            lines.append(f"  {m['program']}/{m['name']}: unreadable ({m['error']})")
        else:
            most = "?" if m.get("max_entries") is None else f"{m['max_entries']:,}"
            lines.append(f"  {m['program']}/{m['name']}: {m['entries']:,} / {most} entries")
    if not maps:
        lines.append("  none")
    perf = status.get("performance") or {}
    window = perf.get("window_s")
    lines.append(f"Performance{f' (last {window:g} s)' if window else ''}:")
    lines.append(f"  Events/s: {_number(perf.get('events_per_s'))}")
    lines.append(f"  Drops/s: {_number(perf.get('drops_per_s'))}")
    lines.append(f"  Average latency: {_number(perf.get('avg_latency_us'))} µs")
    lines.append("Health:")
    if health is None:
        lines.append(f"  unknown: {health_note}")
    else:
        for check in health.get("details", []):
            state = "OK" if check.get("healthy") else "FAILED"
            critical = " [CRITICAL]" if check.get("critical") else ""
            message = f": {check['message']}" if check.get("message") else ""
            lines.append(f"  {check.get('name', '?')}: {state}{critical}{message}")
        lines.append(f"  overall: {'HEALTHY' if health.get('healthy') else 'UNHEALTHY'}")
    return "\n".join(lines) + "\n"


def render_runbooks(health: dict[str, Any] | None) -> str:
    """The runbook section (docs/runbooks.md) of each failing check, each section once."""
    from .runbooks import runbook_section

    out: list[str] = []
    for check in (health or {}).get("details", []):
        if check.get("healthy"):
            continue
        section = runbook_section(str(check.get("name", "")))
        if section is not None and section not in out:
            out.append(section)
    if not out:
        return ""
    return "\nRunbook (docs/runbooks.md):\n\n" + "\n".join(out)


def cmd_diag(args: argparse.Namespace) -> int:
    agent = _agent(args, "health_check_port", "health_bind", args.host, args.port, args.timeout)
    code, status = agent.get_json("/status", maps=1)
    if code != 200 or not isinstance(status, dict):
        raise AgentError(f"{agent.address}/status answered HTTP {code}: is it a bpfpipe agent?")
    health: dict[str, Any] | None = None
    note = ""
    code, ready = agent.get_json("/health/ready")
    if code in (200, 503) and isinstance(ready, dict) and "healthy" in ready:
        health = ready
    else:
        note = f"/health/ready answered HTTP {code}"
    sys.stdout.write(render_diag(status, health, note))
    sys.stdout.write(render_runbooks(health))
    sys.stdout.flush()
    if health is None:
        return EXIT_UNHEALTHY  # health unknown is not healthy
    return 0 if health.get("healthy") else EXIT_UNHEALTHY


# -- top ---------------------------------------------------------------------------------


def _percent(fraction: Any) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _stage_rates(status: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, float]:
    """Events/s through each stage since the previous screen (what it sent, or for a
    sink what it delivered), from two documents' counters and uptimes."""
    if previous is None:
        return {}
    dt = float(status.get("uptime_s", 0)) - float(previous.get("uptime_s", 0))
    if dt <= 0:
        return {}
    before = {s["name"]: s for s in previous.get("stages", [])}
    rates = {}
    for s in status.get("stages", []):
        old = before.get(s["name"])
        if old is not None:
            key = "delivered_events" if s["kind"] == "sink" else "sent_events"
            rates[s["name"]] = max(0.0, (s[key] - old[key]) / dt)
    return rates


def render_top(
    status: dict[str, Any] | None,
    problem: str,
    address: str,
    interval: float,
    previous: dict[str, Any] | None = None,
) -> Any:
    """The rich renderable of one ``top`` screen (``previous``: the last document, for rates)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    header = Text(f"bpfpipe top — {address} — every {interval:g} s — q quits", style="bold")
    if status is None:
        return Group(header, Text(f"agent unreachable: {problem} (retrying)", style="bold red"))
    perf = status.get("performance") or {}
    summary = Text(
        f"{status.get('state', '?')}, up {_number(status.get('uptime_s'))} s, "
        f"v{status.get('version', '?')} | events/s {_number(perf.get('events_per_s'))} "
        f"| drops/s {_number(perf.get('drops_per_s'))} | latency {_number(perf.get('avg_latency_us'))} µs "
        f"| in flight {status.get('inflight', {}).get('events', '?')}"
    )
    rates = _stage_rates(status, previous)
    stages = Table(title="stages", expand=True)
    for column in ("stage", "kind", "events/s", "received", "sent", "dropped", "delivered", "errors"):
        stages.add_column(column, justify="left" if column in ("stage", "kind") else "right")
    for s in status.get("stages", []):
        stages.add_row(
            s["name"],
            s["kind"],
            _number(rates.get(s["name"])),
            f"{s['received_events']:,}",
            f"{s['sent_events']:,}",
            f"{s['dropped_events']:,}",
            f"{s['delivered_events']:,}",
            str(s["errors"]),
        )
    channels = Table(title="channels", expand=True)
    for column in ("channel", "depth", "capacity", "peak"):
        channels.add_column(column, justify="left" if column == "channel" else "right")
    for c in status.get("channels", []):
        channels.add_row(c["name"], str(c["depth"]), str(c["capacity"]), str(c["peak_depth"]))
    flow = Table(title="sampling, breakers, rings", expand=True)
    flow.add_column("what")
    flow.add_column("where")
    flow.add_column("value", justify="right")
    sampling = status.get("sampling", {})
    for u in sampling.get("user", []):
        flow.add_row("sampling (user)", u["stage"], f"1 in {u['sample_rate']}")
    for k in sampling.get("kernel", []):
        flow.add_row("sampling (kernel)", k["program"], f"1 in {k['sample_rate']}")
    for b in status.get("breakers", []):
        flow.add_row("breaker", b["stage"], str(b["state"]))
    for r in status.get("rings", []):
        usage = f"{_percent(r['ring_usage'])} (peak {_percent(r['peak_ring_usage'])})"
        flow.add_row("ring", f"{r['stage']} ({r['program']})", usage)
    if not flow.row_count:
        flow.add_row("-", "no sampler, breaker or ring in this pipeline", "")
    return Group(header, summary, stages, channels, flow)


class _Keys:
    """The terminal in cbreak mode (keys without Enter, Ctrl-C still a signal), restored on exit."""

    def __init__(self, stream: TextIO) -> None:
        self.fd = stream.fileno() if stream.isatty() else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Keys:
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait_quit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True if ``q`` was pressed (or input ended)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.fd is None:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 64)
                if not data or b"q" in data.lower():
                    return True
        return False


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from ._signals import Interrupted

    agent = _agent(args, "health_check_port", "health_bind", args.host, args.port, 5.0)
    console = Console()
    try:
        with _Keys(sys.stdin) as keys, Live(console=console, screen=True, auto_refresh=False) as live:
            previous: dict[str, Any] | None = None
            while True:
                status: dict[str, Any] | None = None
                problem = ""
                try:
                    code, doc = agent.get_json("/status")
                    if code == 200 and isinstance(doc, dict):
                        status = doc
                    else:
                        problem = f"/status answered HTTP {code}"
                except BpfpipeError as exc:
                    problem = str(exc)
                screen = render_top(status, problem, agent.address, args.interval, previous)
                live.update(screen, refresh=True)
                previous = status
                if keys.wait_quit(args.interval):
                    return 0
    except (KeyboardInterrupt, Interrupted):
        return 0


# -- tap ---------------------------------------------------------------------------------


def _lines(response: Any) -> Iterator[bytes]:
    while line := response.readline():
        yield line


def cmd_tap(args: argparse.Namespace) -> int:
    from ._signals import Interrupted, say

    # The tap ends by itself at its timeout; reads wait a little longer than that.
    agent = _agent(args, "admin_port", "admin_bind", args.admin_host, args.admin_port, args.timeout + 5.0)
    response = agent.open("/admin/tap", stage=args.stage, count=args.count, timeout_s=args.timeout)
    with response:
        if response.status != 200:
            try:
                message = json.loads(response.read()).get("error", "")
            except (ValueError, AttributeError, OSError):
                message = ""
            error = message or f"HTTP {response.status}"
            if response.status == 401:
                raise UsageError(
                    f"admin API on {agent.address}: {error} (see --token-file, admin_token_file)"
                )
            if response.status in (400, 404):
                raise UsageError(f"tap: {error}")
            raise AgentError(f"admin API on {agent.address} answered: {error}")
        out = sys.stdout.buffer
        summary: dict[str, Any] | None = None
        try:
            for line in _lines(response):
                if line.startswith(b'{"_tap":'):
                    summary = json.loads(line)["_tap"]
                    continue
                out.write(line)
                out.flush()
        except Interrupted as exc:
            say("bpfpipe: tap interrupted")
            return 128 + exc.signum
        except BrokenPipeError:
            return 0  # `bpfpipe tap ... | head` is fine
        except OSError as exc:
            raise NoAgent(agent.address, agent.key, f"connection broke: {exc}") from None
    if summary is None:
        raise AgentError(f"the tap on {agent.address} ended without its summary line")
    dropped = summary.get("dropped_copies", 0)
    note = f"; {dropped} copies dropped (the tap's buffer was full)" if dropped else ""
    say(
        f"bpfpipe: tap: {summary.get('events', 0)} events from {summary.get('stage')!r} "
        f"(ended: {summary.get('ended')}){note}"
    )
    return 0
