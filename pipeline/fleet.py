"""Fleet policy (issue #11): one policy for many agents, from a NATS JetStream key-value bucket.

The bucket (``fleet.bucket``, default ``bpfpipe-policy``) holds JSON documents:

==================  =====================================================================
key                 value
==================  =====================================================================
``global``          the policy every agent runs
``node.<name>``     one agent's override, merged over ``global`` leaf by leaf
``status.<name>``   written by that agent: what it runs (:class:`NodeStatus`)
==================  =====================================================================

A policy is the *policy subset* of the config, nothing else (:data:`POLICY_LEAVES`)::

    {"source": {"config": {"blocked_ips": ["10.0.0.5", "2001:db8::/32"],
                           "rate_limit": {"pps": 100, "burst": 0}}},
     "sampler": {"min_sample_rate": 1, "max_sample_rate": 500},
     "limits": {"max_events_per_sec": 200000},
     "feature_flags": {"enhanced_metrics": true}}

``source.config.*`` applies to an ``xdp_firewall`` source (other agents ignore it),
``sampler.*`` to every ``sampler`` stage, ``limits.*`` and ``feature_flags.*`` to the
agent. Any other key is an error naming its path (``global: limits.max_event_per_sec:
unknown key (did you mean 'max_events_per_sec'?)``).

Theory of operation
-------------------
1. **Merge, then validate whole.** The agent watches ``global`` and its ``node.<name>``;
   on every change it parses both (:func:`parse_policy`), merges the override over the
   global leaf by leaf (:func:`merge_policies`) and validates the result
   (:func:`validate_policy`: the same checks on every node, so a bad policy is rejected by
   every agent alike). The checks that depend on the node (a prefix list too long for its
   map, a sampler bound against its own other bound) are the Reloader's.
2. **Apply through the Reloader.** The candidate config is the running one with every
   policy leaf set: the policy's value where it has one, else the agent's own (its
   *base*: what its config said before any policy, kept up to date across SIGHUP and
   admin reloads for the leaves the policy does not set: :func:`refresh_base`). It goes
   through :meth:`Reloader.apply_document`: validated whole, applied atomically,
   versioned, map updates by difference. A policy rejected at either step changes nothing.
3. **Report.** After every attempt the agent writes ``status.<node>`` (revisions applied,
   config version, time, error if rejected).
4. **Unreachable control plane.** The agent keeps its last applied policy, logs once,
   retries; once back, the watch delivers the latest values and the agent catches up.
   A SIGHUP or admin reload (which may revert policy leaves to the file's values) is
   followed by the policy applied again.

The pure part (keys, parsing, merging, validating, the candidate config, the status
document) does no I/O; :class:`FleetAgent` is the trio shell, and
``pipeline._fleet_client`` the nats-py (asyncio) client it drives through
``pipeline.asyncio_bridge``.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from bpf.firewall_policy import RateLimit, parse_blocked_ips

from .config import FLEET_NAME, FeatureFlags, FleetConfig, LimitsConfig, config_error_from
from .errors import BpfpipeError, ConfigError
from .sampling import Rate, SamplingParams

if TYPE_CHECKING:
    from ._graph import Pipeline
    from .config import Config
    from .reload import Reloader

__all__ = [
    "GLOBAL_KEY",
    "POLICY_LEAVES",
    "ControlPlaneUnreachable",
    "FleetAgent",
    "NodeStatus",
    "Policy",
    "capture_base",
    "evaluate",
    "merge_policies",
    "node_key",
    "node_name",
    "parse_policy",
    "policy_candidate",
    "policy_document",
    "refresh_base",
    "status_key",
    "validate_policy",
]

log = logging.getLogger("bpfpipe.fleet")

GLOBAL_KEY: Final = "global"
FIREWALL_SOURCES = frozenset({"xdp_firewall"})
"""Sources that take ``source.config.blocked_ips`` / ``rate_limit``; other agents ignore them."""

Policy = dict[str, Any]
"""A parsed policy, flat: leaf path (one of :data:`POLICY_LEAVES`) → value (JSON builtins)."""


def node_key(node: str) -> str:
    return f"node.{node}"


def status_key(node: str) -> str:
    return f"status.{node}"


def node_name(settings: FleetConfig, hostname: str | None = None) -> str:
    """``fleet.node``, or the host name's first label with anything a key cannot hold as ``_``."""
    if settings.node:
        return settings.node
    host = (hostname if hostname is not None else socket.gethostname()).split(".", 1)[0]
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in host)[:64]
    return name if FLEET_NAME.match(name) else "unnamed"


# -- the policy document ---------------------------------------------------------------------


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class _FirewallPolicy(_Strict, frozen=True):
    blocked_ips: list[str] | msgspec.UnsetType = msgspec.UNSET
    rate_limit: RateLimit | msgspec.UnsetType = msgspec.UNSET


class _SourcePolicy(_Strict, frozen=True):
    config: _FirewallPolicy = _FirewallPolicy()


class SamplerBounds(_Strict, frozen=True):
    """The sampler's bounds a policy may set (their meaning: ``pipeline.sampling.SamplingParams``)."""

    min_sample_rate: Rate | msgspec.UnsetType = msgspec.UNSET
    max_sample_rate: Rate | msgspec.UnsetType = msgspec.UNSET


class _PolicyDocument(_Strict, frozen=True):
    source: _SourcePolicy | msgspec.UnsetType = msgspec.UNSET
    sampler: SamplerBounds | msgspec.UnsetType = msgspec.UNSET
    limits: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    """Checked against :class:`~pipeline.config.LimitsConfig` (one definition of each bound)."""
    feature_flags: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    """Checked against :class:`~pipeline.config.FeatureFlags`."""


POLICY_LEAVES: Final = (
    "source.config.blocked_ips",
    "source.config.rate_limit",
    "sampler.min_sample_rate",
    "sampler.max_sample_rate",
    *(f"limits.{name}" for name in LimitsConfig.__struct_fields__),
    *(f"feature_flags.{name}" for name in FeatureFlags.__struct_fields__),
)
"""Every key a policy may set (a ``rate_limit`` is one leaf: ``{pps, burst}`` whole)."""

MAX_POLICY_BYTES = 256 * 1024


def parse_policy(data: bytes | Mapping[str, Any], where: str) -> Policy:
    """One key's document, checked leaf by leaf; ``ConfigError`` ``<where>: <key.path>: problem``."""
    raw: Any = data
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_POLICY_BYTES:
            raise ConfigError(where, f"policy is over {MAX_POLICY_BYTES} bytes")
        try:
            raw = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise ConfigError(where, f"not JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a JSON object, got {type(raw).__name__}")
    try:
        doc = msgspec.convert(raw, _PolicyDocument, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(where, str(config_error_from(exc, raw, _PolicyDocument))) from None
    policy: Policy = {}
    if not isinstance(doc.source, msgspec.UnsetType):
        for name in ("blocked_ips", "rate_limit"):
            value = getattr(doc.source.config, name)
            if not isinstance(value, msgspec.UnsetType):
                policy[f"source.config.{name}"] = msgspec.to_builtins(value)
    if not isinstance(doc.sampler, msgspec.UnsetType):
        for name in ("min_sample_rate", "max_sample_rate"):
            value = getattr(doc.sampler, name)
            if not isinstance(value, msgspec.UnsetType):
                policy[f"sampler.{name}"] = value
    for section, struct in (("limits", LimitsConfig), ("feature_flags", FeatureFlags)):
        given = getattr(doc, section)
        if isinstance(given, msgspec.UnsetType):
            continue
        try:
            msgspec.convert(given, struct, strict=True)  # every leaf's type and bounds
        except msgspec.ValidationError as exc:
            inner = config_error_from(exc, given, struct, prefix=section)
            raise ConfigError(where, str(inner)) from None
        policy.update({f"{section}.{name}": value for name, value in given.items()})
    return policy


def merge_policies(global_policy: Policy, override: Policy) -> Policy:
    """The override over the global policy, leaf by leaf."""
    return {**global_policy, **override}


def validate_policy(policy: Policy) -> None:
    """The checks of a merged policy that hold on every node (``ConfigError`` naming the key)."""
    blocked = policy.get("source.config.blocked_ips")
    if blocked is not None:
        parse_blocked_ips(blocked, path="source.config.blocked_ips")
    low, high = policy.get("sampler.min_sample_rate"), policy.get("sampler.max_sample_rate")
    if low is not None and high is not None:
        try:
            SamplingParams(min_sample_rate=low, max_sample_rate=high)
        except ValueError as exc:
            raise ConfigError("sampler", str(exc)) from None


def policy_document(policy: Policy) -> dict[str, Any]:
    """The flat policy as the nested JSON document it came from."""
    out: dict[str, Any] = {}
    for leaf in POLICY_LEAVES:
        if leaf in policy:
            *tables, name = leaf.split(".")
            table = out
            for key in tables:
                table = table.setdefault(key, {})
            table[name] = policy[leaf]
    return out


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What the bucket's current values mean for one node."""

    revisions: dict[str, int]
    """``global`` and ``node.<name>`` → revision (0: the key does not exist)."""
    policy: Policy | None
    """The merged, validated policy; None when rejected."""
    error: str = ""


def evaluate(node: str, layers: Mapping[str, tuple[int, bytes | None]]) -> Evaluation:
    """Parse, merge and validate ``global`` and ``node.<node>`` (key → (revision, value or None))."""
    keys = (GLOBAL_KEY, node_key(node))
    revisions = {key: layers.get(key, (0, None))[0] for key in keys}
    try:
        parsed = []
        for key in keys:
            value = layers.get(key, (0, None))[1]
            parsed.append(parse_policy(value, key) if value else {})
        merged = merge_policies(*parsed)
        validate_policy(merged)
    except ConfigError as exc:
        return Evaluation(revisions, None, str(exc))
    return Evaluation(revisions, merged)


# -- from a policy to a candidate config ------------------------------------------------------

Path = tuple[str | int, ...]
_ABSENT: Any = msgspec.UNSET
Base = dict[Path, Any]
"""Concrete config path of a policy leaf → the agent's own value there (``_ABSENT``: unset)."""

_FIREWALL_DEFAULTS: dict[str, Any] = {"blocked_ips": [], "rate_limit": msgspec.to_builtins(RateLimit())}


def _targets(doc: Mapping[str, Any], leaf: str) -> list[Path]:
    """Where ``leaf`` lives in this config document (none: it does not apply here)."""
    section, name = leaf.rsplit(".", 1)
    if section in ("limits", "feature_flags"):
        return [(section, name)]
    if section == "source.config":
        return [("source", "config", name)] if doc["source"]["use"] in FIREWALL_SOURCES else []
    return [("stages", i, "config", name) for i, s in enumerate(doc["stages"]) if s["use"] == "sampler"]


def _get(doc: Any, path: Path) -> Any:
    for key in path:
        try:
            doc = doc[key]
        except (KeyError, IndexError, TypeError):
            return _ABSENT
    return doc


def _default(leaf: str) -> Any:
    section, name = leaf.rsplit(".", 1)
    if section == "source.config":
        return _FIREWALL_DEFAULTS[name]
    return msgspec.to_builtins(getattr(SamplingParams(), name))  # limits/flags are always materialized


def capture_base(doc: Mapping[str, Any]) -> Base:
    """The agent's own values of every policy leaf in ``doc`` (a normalized config document)."""
    return {path: _get(doc, path) for leaf in POLICY_LEAVES for path in _targets(doc, leaf)}


def refresh_base(base: Base, doc: Mapping[str, Any], applied: Policy) -> Base:
    """``base`` updated from the running ``doc`` where the applied policy does not set the
    leaf (a reload may have changed it: the config is the truth there) or the path is new."""
    out = dict(base)
    for leaf in POLICY_LEAVES:
        for path in _targets(doc, leaf):
            if leaf not in applied or path not in out:
                out[path] = _get(doc, path)
    return out


def policy_candidate(doc: Mapping[str, Any], base: Base, policy: Policy) -> dict[str, Any]:
    """The partial document (top-level keys that change) that makes ``doc`` run ``policy``:
    every leaf at the policy's value, or at the base value where the policy has none.
    Deep-merged over ``doc`` it gives the whole candidate (values are set, never removed:
    an unset leaf that must go back is set to its default)."""
    candidate = copy.deepcopy(dict(doc))
    for leaf in POLICY_LEAVES:
        for path in _targets(doc, leaf):
            want = policy[leaf] if leaf in policy else base.get(path, _get(doc, path))
            if want is _ABSENT:
                if _get(doc, path) is _ABSENT:
                    continue
                want = _default(leaf)
            table: Any = candidate
            for key in path[:-1]:
                table = table[key]
            table[path[-1]] = copy.deepcopy(want)
    return {key: candidate[key] for key in candidate if candidate[key] != doc.get(key)}


# -- the status document ----------------------------------------------------------------------


class NodeStatus(msgspec.Struct, kw_only=True):
    """``status.<node>``: what the node runs, written after every policy it tried."""

    node: str
    ok: bool
    """The last policy seen was applied (False: rejected, ``error`` says why)."""
    revisions: dict[str, int]
    """Revisions of ``global`` and ``node.<node>`` the node runs (0: no such key)."""
    config_version: int
    """The agent's config version (``GET /admin/config``) after applying them."""
    applied_unix: float
    """When the policy it runs was applied (0: none yet)."""
    updated_unix: float
    error: str = ""
    rejected_revisions: dict[str, int] = {}
    """The revisions it rejected (when not ``ok``)."""


_STATUS_DECODER = msgspec.json.Decoder(NodeStatus)


def encode_status(status: NodeStatus) -> bytes:
    return msgspec.json.encode(status)


def decode_status(data: bytes) -> NodeStatus:
    return _STATUS_DECODER.decode(data)


# -- the shell --------------------------------------------------------------------------------


class ControlPlaneUnreachable(BpfpipeError):
    """No NATS server answered (or the connection was lost): exit 4, like a client
    command (``diag``, ``top``, ``tap``) that finds no agent."""

    exit_code = 4


RETRY_INTERVAL_S = 1.0
"""Between attempts to reach an unreachable control plane."""
POLL_INTERVAL_S = 0.2
"""How long one wait for bucket changes lasts (a reload's re-apply waits at most this)."""


@dataclass
class FleetAgent:
    """The pipeline helper that runs the fleet policy (see the module docstring)."""

    settings: FleetConfig
    reloader: Reloader
    clock: Any = time.time
    node: str = ""
    layers: dict[str, tuple[int, bytes | None]] = field(default_factory=dict)
    applied: Policy = field(default_factory=dict)
    applied_revisions: dict[str, int] = field(default_factory=dict)
    applied_unix: float = 0.0
    _tried: dict[str, int] | None = None
    _status: NodeStatus | None = None
    _base: Base | None = None
    _applying: bool = False
    _reapply: bool = False
    _outage: bool = False

    def __post_init__(self) -> None:
        self.node = self.node or node_name(self.settings)
        self.reloader.listeners.append(self._on_reload)

    def _on_reload(self, config: Config) -> None:
        if not self._applying:  # a SIGHUP or admin reload: put the policy back over it
            self._reapply = True

    async def run(
        self, pipe: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from .asyncio_bridge import open_asyncio_thread

        async with open_asyncio_thread("bpfpipe-fleet") as thread:
            task_status.started()
            log.info(
                "fleet policy: watching",
                extra={
                    "node": self.node,
                    "bucket": self.settings.bucket,
                    "servers": ",".join(self.settings.servers),
                },
            )
            while True:
                try:
                    await self._session(thread)
                except Exception as exc:  # the agent runs on, whatever the control plane does
                    if not self._outage:
                        self._outage = True
                        error = str(exc) if isinstance(exc, BpfpipeError) else f"{type(exc).__name__}: {exc}"
                        log.warning(
                            "fleet control plane unreachable: running on the last applied policy, retrying",
                            extra={
                                "node": self.node,
                                "error": error,
                                "revisions": _show(self.applied_revisions),
                            },
                        )
                await trio.sleep(RETRY_INTERVAL_S)
                if self._reapply and self._status is not None:
                    # A SIGHUP or admin reload meanwhile: the last known policy goes back over it
                    # now; the status follows once the control plane is back.
                    self._reapply = False
                    self._status = await self._apply()

    async def _session(self, thread: Any) -> None:
        from ._fleet_client import KvClient

        settings = self.settings
        client = await thread.run(
            KvClient.open(settings.servers, settings.bucket, settings.connect_timeout_s, create=True)
        )
        try:
            await thread.run(client.watch([GLOBAL_KEY, node_key(self.node)]))
            if self._outage:
                self._outage = False
                log.info("fleet control plane reachable again", extra={"node": self.node})
            reported = False  # each session reports once the watch has the current values
            while True:
                updates, ready = await thread.run(client.next_updates(POLL_INTERVAL_S))
                for key, revision, value in updates:
                    self.layers[key] = (revision, value)
                if not ready:
                    continue
                revisions = {k: self.layers.get(k, (0, None))[0] for k in (GLOBAL_KEY, node_key(self.node))}
                if revisions != self._tried or self._reapply or self._status is None:
                    self._reapply = False
                    self._status = await self._apply()
                elif reported:
                    continue
                await thread.run(client.put(status_key(self.node), encode_status(self._status)))
                reported = True
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await thread.run(client.close())

    async def _apply(self) -> NodeStatus:
        """Evaluate the bucket's values and apply them through the Reloader; the status to write."""
        evaluation = evaluate(self.node, self.layers)
        self._tried = evaluation.revisions
        error = evaluation.error
        if evaluation.policy is not None:
            doc = self.reloader.effective()["config"]
            base = refresh_base(
                self._base if self._base is not None else capture_base(doc), doc, self.applied
            )
            partial = policy_candidate(doc, base, evaluation.policy)
            ok = True
            if partial:
                reloads = self.reloader.statistics().reloads
                self._applying = True
                try:
                    result = await self.reloader.apply_document(partial)
                finally:
                    self._applying = False
                ok, error = result.ok, result.error
                if self.reloader.statistics().reloads > reloads + result.ok:
                    self._reapply = True  # another reload ran while this one waited its turn
            if ok:
                self._base = base
                self.applied = evaluation.policy
                self.applied_revisions = evaluation.revisions
                self.applied_unix = self.clock()
                version = self.reloader.statistics().version
                log.info(  # revisions and version in the text: each application its own line, never folded
                    f"fleet policy applied: {_revision_text(evaluation.revisions)}, config version {version}",
                    extra={
                        "node": self.node,
                        "revisions": _show(evaluation.revisions),
                        "version": version,
                        "changed": ",".join(partial) or "-",
                    },
                )
        if error:
            revisions = _revision_text(evaluation.revisions)
            log.error(
                f"fleet policy rejected ({revisions}), running policy kept: {error}",
                extra={"node": self.node, "revisions": _show(evaluation.revisions)},
            )
        return NodeStatus(
            node=self.node,
            ok=not error,
            revisions=self.applied_revisions,
            config_version=self.reloader.statistics().version,
            applied_unix=self.applied_unix,
            updated_unix=self.clock(),
            error=error,
            rejected_revisions=evaluation.revisions if error else {},
        )


def _revision_text(revisions: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {revision}" for key, revision in revisions.items())


def _show(revisions: Mapping[str, int]) -> str:
    return json.dumps(dict(revisions), separators=(",", ":"))
