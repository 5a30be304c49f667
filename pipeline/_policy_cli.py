"""``bpfpipe policy get | set FILE | status``: the operator's side of fleet policy.

The servers: ``--servers`` (comma-separated), else ``$BPFPIPE_FLEET_SERVERS``, else
``fleet.servers`` of ``--config`` (default ``$BPFPIPE_CONFIG``); the bucket likewise
(``--bucket``, ``fleet.bucket``). ``set`` validates the file before connecting (and then
the merge with the other layer(s) in the bucket), so a bad policy never reaches the
agents. Every failure is one line and an exit code: 2 bad input or usage, 4 the
control plane unreachable (as ``diag`` with no agent), 1 the bucket missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

# Light at import (the parser is built for every command): the rest is imported on use.
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import FleetConfig

__all__ = ["add_policy_parser", "cmd_policy"]

EXAMPLES = """\
examples:
  bpfpipe policy set policy.json --servers nats://10.0.0.1:4222   the global policy
  bpfpipe policy set edge.json --node edge-1                      one node's override
  bpfpipe policy get --node edge-1
  bpfpipe policy status                                           what every agent runs
environment: BPFPIPE_FLEET_SERVERS (comma-separated URLs), BPFPIPE_CONFIG
exit codes: 0 ok, 1 no bucket yet, 2 bad policy or usage, 4 control plane unreachable
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 60], got {text!r}")
    return value


def add_policy_parser(sub: argparse._SubParsersAction[Any]) -> None:
    policy = sub.add_parser(
        "policy",
        help="fleet policy in NATS JetStream: get, set, status",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = policy.add_subparsers(
        dest="policy_command", metavar="get|set|status", required=True, parser_class=type(policy)
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--servers", metavar="URLS", help="NATS servers, comma-separated")
        p.add_argument("--bucket", metavar="NAME", help="key-value bucket (default: fleet.bucket)")
        p.add_argument(
            "--config", metavar="FILE", help="take [fleet] from this config (default: $BPFPIPE_CONFIG)"
        )
        p.add_argument(
            "--timeout", type=_seconds, default=None, metavar="S", help="connect timeout (default 2)"
        )

    get = actions.add_parser("get", help="print the global policy, or a node's override (JSON)")
    get.add_argument("--node", metavar="N", help="the override of node N")
    common(get)
    put = actions.add_parser(
        "set", help="validate FILE (JSON) and store it as the global policy or an override"
    )
    put.add_argument("file", metavar="FILE", help="policy document (JSON; '-' reads stdin)")
    put.add_argument("--node", metavar="N", help="store it as node N's override")
    common(put)
    status = actions.add_parser("status", help="a table of the nodes: revisions applied, when, error")
    status.add_argument("--json", action="store_true", help="the status documents as JSON lines")
    common(status)


def _settings(args: argparse.Namespace) -> FleetConfig:
    from .config import FleetConfig, decode_config, read_toml

    path = args.config or os.environ.get("BPFPIPE_CONFIG")
    fleet = decode_config(read_toml(path)).fleet if path else FleetConfig()
    servers = args.servers or os.environ.get("BPFPIPE_FLEET_SERVERS", "")
    changes: dict[str, Any] = {}
    if servers:
        changes["servers"] = [s.strip() for s in servers.split(",") if s.strip()]
    if args.bucket:
        changes["bucket"] = args.bucket
    if args.timeout is not None:
        changes["connect_timeout_s"] = args.timeout
    if changes:
        raw = {**{f: getattr(fleet, f) for f in fleet.__struct_fields__}, **changes}
        fleet = decode_config({"fleet": raw}).fleet
    if not fleet.servers:
        raise ConfigError(
            "--servers", "no NATS servers: give --servers, $BPFPIPE_FLEET_SERVERS or [fleet] servers"
        )
    return fleet


def _node(args: argparse.Namespace) -> str | None:
    from .config import decode_config

    if getattr(args, "node", None) is None:
        return None
    decode_config({"fleet": {"node": args.node}})  # the same rule as fleet.node
    return str(args.node)


def cmd_policy(args: argparse.Namespace) -> int:
    from .fleet import GLOBAL_KEY, node_key, parse_policy

    try:
        node = _node(args)
    except ConfigError as exc:
        raise ConfigError("--node", exc.problem) from None
    if args.policy_command == "set":
        data = _read_policy(args.file)
        parse_policy(data, node_key(node) if node else GLOBAL_KEY)  # before anything is reached
    settings = _settings(args)
    if args.policy_command == "get":
        return _with_client(settings, lambda client: _get(client, node))
    if args.policy_command == "set":
        return _with_client(settings, lambda client: _set(client, node, data), create=True)
    return _with_client(settings, lambda client: _status(client, as_json=args.json))


def _read_policy(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read policy file: {exc.strerror or exc}") from None


def _with_client(
    settings: FleetConfig, action: Callable[[Any], Awaitable[int]], *, create: bool = False
) -> int:
    """``action(client)`` on a connection to the bucket (made first if ``create``)."""
    from ._fleet_client import KvClient

    async def main() -> int:
        client = await KvClient.open(
            settings.servers, settings.bucket, settings.connect_timeout_s, create=create
        )
        try:
            return await action(client)
        finally:
            await client.close()

    return asyncio.run(main())


async def _get(client: Any, node: str | None) -> int:
    """The stored document as it is (even one the agents reject: that is when it is wanted)."""
    from .fleet import GLOBAL_KEY, node_key

    _, value = await client.get(node_key(node) if node else GLOBAL_KEY)
    try:
        text = json.dumps(json.loads(value or b"{}"), indent=2)
    except ValueError:
        text = (value or b"").decode("utf-8", "replace")
    sys.stdout.write(text + "\n")
    return 0


async def _set(client: Any, node: str | None, data: bytes) -> int:
    from .fleet import GLOBAL_KEY, merge_policies, node_key, parse_policy, policy_document, validate_policy

    key = node_key(node) if node else GLOBAL_KEY
    policy = parse_policy(data, key)
    # The merge each agent will validate: this override over the global policy, or the
    # global policy under every override in the bucket.
    if node:
        _, global_value = await client.get(GLOBAL_KEY)
        validate_policy(
            merge_policies(parse_policy(global_value, GLOBAL_KEY) if global_value else {}, policy)
        )
    else:
        validate_policy(policy)
        for other in sorted(k for k in await client.keys() if k.startswith("node.")):
            _, value = await client.get(other)
            if value:
                try:
                    validate_policy(merge_policies(policy, parse_policy(value, other)))
                except ConfigError as exc:
                    raise ConfigError(other, f"with this global policy: {exc}") from None
    revision = await client.put(key, json.dumps(policy_document(policy)).encode())
    sys.stdout.write(f"{key}: revision {revision}\n")
    return 0


async def _status(client: Any, *, as_json: bool) -> int:
    from .fleet import GLOBAL_KEY, NodeStatus, decode_status

    statuses: list[NodeStatus] = []
    for key in sorted(k for k in await client.keys() if k.startswith("status.")):
        _, value = await client.get(key)
        if value:
            try:
                statuses.append(decode_status(value))
            except ValueError:  # msgspec's DecodeError/ValidationError: someone else's key
                continue
    if as_json:
        for status in statuses:
            sys.stdout.write(json.dumps({f: getattr(status, f) for f in status.__struct_fields__}) + "\n")
        return 0
    rows = [("NODE", "OK", "GLOBAL", "NODE REV", "CONFIG", "APPLIED", "ERROR")]
    for s in statuses:
        rows.append(
            (
                s.node,
                "yes" if s.ok else "no",
                str(s.revisions.get(GLOBAL_KEY, 0)),
                str(s.revisions.get(f"node.{s.node}", 0)),
                str(s.config_version),
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.applied_unix)) if s.applied_unix else "-",
                s.error or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        sys.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + f"  {row[-1]}\n"
        )
    return 0
