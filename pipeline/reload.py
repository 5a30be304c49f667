"""Live reload (issue #9): change the running agent's config without a restart.

Two ways in, one transaction: SIGHUP re-reads the config file (with the environment
and the command-line flags over it, the same precedence as at startup:
:meth:`Reloader.reload_file`), and ``POST /admin/config`` deep-merges a partial
document over the current effective config (:meth:`Reloader.apply_document`).

Theory of operation
-------------------
1. **Validate whole, first.** The candidate document is decoded
   (:func:`~pipeline.config.decode_config`) and its graph built
   (:func:`~pipeline._build.build_specs`: every stage resolved, its config decoded
   and resolved), with the same errors, naming the same key paths, as at startup.
   A candidate that fails changes nothing: one log line (``config reload failed``)
   naming the key path, ``failures`` counts it, the version stays.
2. **Classify every changed key** (the pure :func:`plan_reload`; table below) into
   *live* (applied in place), *chain* (applied in place by a stage's
   ``reconfigure``, else by switching the stage chain) and *restart-required*
   (reported in the result and in one warning line, and **not** applied: the
   effective config keeps the running value, so nothing is half-applied). The live
   parts of the same reload still apply.
3. **Apply**: the in-place ``reconfigure`` calls first, then the chain switch
   (:meth:`Pipeline.replace_chain`: the new chain is built and started behind the
   running source, the switch is a batch boundary). If a ``reconfigure`` raises, or
   building the new chain fails, the ``reconfigure`` calls already made are undone
   (the nodes are reconfigured back) and nothing has changed. Then the
   agent-wide settings (log level, the in-flight budget, the resource enforcer,
   ``enhanced_metrics``, the health checks...).
4. **Version**: starts at 1, increments when (and only when) a reload changed the
   effective config. A no-op reload — the same file again, or one whose only changes
   need a restart — succeeds with the version unchanged (``last_reload_unix`` is
   still the time of the last *successful* reload, no-op or not, as Prometheus'
   own ``config_last_reload_success_timestamp_seconds`` is).

Reloads are serialized (one ``trio.Lock``): a SIGHUP during a POST waits its turn.
A POST is merged over the effective config *at its turn*; a later SIGHUP re-reads
the file, which is the source of truth again (what a POST changed is gone unless
the file has it too).

What applies how (:data:`KEY_CLASSES`)
--------------------------------------
=====================================  ====================================================
key                                    how
=====================================  ====================================================
``log_level``, ``enable_debug``        live: the ``bpfpipe`` logger's level
``feature_flags.enhanced_metrics``     live: ``MetricsExporter.enhanced``
``feature_flags.new_parser``           live: the decoder's resolved ``parser`` changes, and
                                       the decoder is reconfigured (strict string checks)
``limits.*``                           live: the in-flight budget, the resource enforcer;
                                       ``max_events_per_sec`` reaches the sampler through its
                                       resolved config
``health.*``, ``shutdown.*``           live: the pipeline's settings, and the listeners
                                       (``HealthMonitor.update``)
``[[stages]]``, ``sink``,              chain: a node whose config alone changed and that is
``channels.*``                         :class:`Reconfigurable` (covering the changed fields)
                                       is updated in place; anything else (a node added,
                                       removed, reordered; ``use``/``name``/``capacity``) is
                                       one chain switch
``source.config.<live field>``         live through the source's ``reconfigure`` (the XDP
                                       firewall's ``blocked_ips``, ``rate_limit``)
every other ``source.*``; ports,       restart-required
binds, ``admin_token_file``,
``bpf_map_size``, ``ring_buffer_size``
=====================================  ====================================================
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import msgspec
import trio

from .config import Config, decode_config, merge
from .errors import BpfpipeError, ConfigError

if TYPE_CHECKING:
    from ._enforcer import ResourceEnforcer
    from ._graph import NodeSpec, Pipeline

__all__ = [
    "KEY_CLASSES",
    "NOT_RUNNING",
    "SOURCE_POLICY_FIELDS",
    "ChainPlan",
    "NarrowReconfigurable",
    "Reconfigurable",
    "ReloadPlan",
    "ReloadResult",
    "ReloadStatistics",
    "Reloader",
    "changed_paths",
    "classify",
    "plan_chain",
    "plan_reload",
]

log = logging.getLogger("bpfpipe.reload")

NOT_RUNNING = "the pipeline is not running (starting or stopping): try again once it runs"


# -- the plug-in surface ---------------------------------------------------------------------


@runtime_checkable
class Reconfigurable(Protocol):
    """A node that takes a new config in place.

    ``reconfigure`` gets the node's new *resolved* ``Config`` struct, validated whole,
    from the trio thread, between batches (never concurrently with the stage's own
    code on a batch); it must not block, and should not fail."""

    def reconfigure(self, config: Any) -> None: ...


@runtime_checkable
class NarrowReconfigurable(Reconfigurable, Protocol):
    """A :class:`Reconfigurable` node whose ``reconfigure`` covers only some fields of
    its config (a change of any other field needs a new node: a chain switch for a
    stage, a restart for the source)."""

    live_config_fields: ClassVar[frozenset[str]]


SOURCE_POLICY_FIELDS = frozenset({"blocked_ips", "rate_limit"})
"""What a :class:`Reconfigurable` *source* that does not say otherwise
(``live_config_fields``) applies live: map-backed policy. Everything else of a source
(its program, options, sizes) is compile-time: restart-required."""


def live_fields(node: object, *, source: bool) -> frozenset[str] | None:
    """The config fields ``node``'s ``reconfigure`` covers: an empty set if it has none,
    None for every field."""
    if isinstance(node, NarrowReconfigurable):
        return frozenset(node.live_config_fields)
    if isinstance(node, Reconfigurable):
        return SOURCE_POLICY_FIELDS if source else None
    return frozenset()


@runtime_checkable
class _MetricsSwitch(Protocol):
    enhanced: bool


# -- records -------------------------------------------------------------------------------


class ReloadResult(msgspec.Struct, kw_only=True):
    """What one reload did (the body of ``POST /admin/config``'s answer)."""

    ok: bool
    version: int
    """The effective config's version after the reload."""
    applied: list[str]
    """Changed key paths that took effect."""
    restart_required: list[str]
    """Changed key paths that need a restart; not applied (their running values stay)."""
    error: str = ""
    """Why the reload failed (``key.path: problem``); "" when ``ok``."""
    duration_ms: float = 0.0
    """From the request (the signal received, the POST read) to applied."""
    graph_switched: bool = False
    chain_switch: dict[str, Any] | None = None
    """The chain switch's record (:class:`pipeline.ChainSwitch`: ``inflight_events``,
    ``switch_s``, ``drain_s``) when the graph switched."""


@dataclass(frozen=True, slots=True)
class ReloadStatistics:
    version: int
    failures: int
    """Failed reloads (``bpfpipe_config_reload_failures_total``)."""
    last_reload_unix: float
    """Wall-clock time of the last successful reload (startup counts as the first); 0: none."""
    last_error: str
    reloads: int = 0
    """Successful reloads (no-ops included)."""
    switches: int = 0
    """Reloads that switched the stage chain."""


# -- the pure core ---------------------------------------------------------------------------


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The key paths where two config documents (plain tables) differ, leaves first
    where both sides are tables; a list of another length, or a value of another
    type, is one change at its own path."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out += changed_paths(old[key], new[key], path)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            p
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for p in changed_paths(a, b, f"{prefix}[{i}]")
        ]
    if old == new and type(old) is type(new):
        return []
    return [prefix]


LIVE = "live"
CHAIN = "chain"
SOURCE = "source"
RESTART = "restart"

KEY_CLASSES: dict[str, str] = {
    "log_level": LIVE,
    "enable_debug": LIVE,
    "feature_flags": LIVE,
    "limits": LIVE,
    "health": LIVE,
    "shutdown": LIVE,
    "stages": CHAIN,
    "sink": CHAIN,
    "channels": CHAIN,
    "source": SOURCE,
    "metrics_port": RESTART,
    "metrics_bind": RESTART,
    "health_check_port": RESTART,
    "health_bind": RESTART,
    "admin_port": RESTART,
    "admin_bind": RESTART,
    "admin_token_file": RESTART,
    "bpf_map_size": RESTART,
    "ring_buffer_size": RESTART,
    "fleet": RESTART,
}
"""Top-level key → how a change of it applies (see the module docstring). A key not
here (a new one nobody classified yet) is restart-required: never half-applied."""


def _top(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]


def classify(path: str, source_live: frozenset[str] | None) -> str:
    """``live``, ``chain`` or ``restart`` for one changed key path; ``source_live`` is
    what the running source's ``reconfigure`` covers (see :func:`live_fields`)."""
    kind = KEY_CLASSES.get(_top(path), RESTART)
    if kind != SOURCE:
        return kind
    rest = path.removeprefix("source.config.")
    if rest == path or not rest:  # source.use / .name / .capacity, or the whole table
        return RESTART
    name = rest.split(".", 1)[0].split("[", 1)[0]
    return LIVE if source_live is None or name in source_live else RESTART


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    applied: list[str]
    restart_required: list[str]
    effective: dict[str, Any]
    """The document to run: the candidate with restart-required keys at their running values."""


def plan_reload(
    running: Mapping[str, Any], candidate: Mapping[str, Any], source_live: frozenset[str] | None
) -> ReloadPlan:
    """Classify the candidate's changes (both are normalized documents:
    ``msgspec.to_builtins`` of a decoded :class:`Config`) and say what to run."""
    applied: list[str] = []
    restart: list[str] = []
    for path in changed_paths(running, candidate):
        (restart if classify(path, source_live) == RESTART else applied).append(path)
    effective = dict(candidate)
    for path in restart:
        top = _top(path)
        if top != "source":
            if top in running:
                effective[top] = running[top]
            else:
                effective.pop(top, None)
    if any(_top(p) == "source" for p in restart):
        effective["source"] = _source_keeping_live(running["source"], candidate["source"], source_live)
    return ReloadPlan(applied, restart, effective)


def _source_keeping_live(
    running: Mapping[str, Any], candidate: Mapping[str, Any], live: frozenset[str] | None
) -> dict[str, Any]:
    """The running source table with only its live config fields taken from the candidate."""
    out = dict(running)
    if running.get("use") != candidate.get("use"):  # another source: nothing of it applies
        return out
    config = dict(running.get("config") or {})
    new_config = candidate.get("config") or {}
    for name in live if live is not None else set(config) | set(new_config):
        if name in new_config:
            config[name] = new_config[name]
        else:
            config.pop(name, None)
    out["config"] = config
    return out


@dataclass(frozen=True, slots=True)
class ChainPlan:
    switch: bool
    """The chain after the source must be replaced (:meth:`Pipeline.replace_chain`)."""
    reconfigure: tuple[int, ...] = ()
    """Positions (in the whole chain, 0 = the source) to ``reconfigure`` in place."""


def _struct_changes(old: Any, new: Any) -> set[str]:
    if isinstance(old, msgspec.Struct) and type(old) is type(new):
        return {f for f in old.__struct_fields__ if getattr(old, f) != getattr(new, f)}
    return set() if old == new else {"*"}


def plan_chain(
    running: Sequence[NodeSpec],
    running_capacities: Sequence[int],
    wanted: Sequence[NodeSpec],
    wanted_capacities: Sequence[int],
    covers: Callable[[int], frozenset[str] | None],
) -> ChainPlan:
    """Whether the chain after the source needs a switch, and which nodes (the source
    included) take their new config in place. ``covers(i)``: the fields running node
    ``i`` can reconfigure (:func:`live_fields`). The source itself is never switched
    (its other changes are restart-required and already reverted)."""
    reconfigure: list[int] = []
    if _struct_changes(running[0].config, wanted[0].config) and covers(0) != frozenset():
        reconfigure.append(0)
    same_shape = (
        len(running) == len(wanted)
        and list(running_capacities) == list(wanted_capacities)
        and all(a.name == b.name and a.factory is b.factory for a, b in zip(running, wanted, strict=True))
    )
    if not same_shape:
        return ChainPlan(True, tuple(reconfigure))
    for i in range(1, len(running)):
        changed = _struct_changes(running[i].config, wanted[i].config)
        if not changed:
            continue
        fields = covers(i)
        if fields is not None and not changed <= fields:
            return ChainPlan(True, tuple(reconfigure))
        reconfigure.append(i)
    return ChainPlan(False, tuple(reconfigure))


# -- the shell -------------------------------------------------------------------------------


def _document(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(config)
    return out


class _Failed(Exception):
    pass


def _undo(done: Sequence[tuple[Reconfigurable, Any]]) -> None:
    """Put nodes reconfigured by a reload that then failed back to their old configs."""
    for node, old in reversed(done):
        try:
            node.reconfigure(old)
        except Exception as exc:  # nothing more to do than say so
            log.error("could not undo a reconfigure: %s: %s", type(exc).__name__, exc)


@dataclass
class Reloader:
    """Applies new configs to a running agent; see the module docstring.

    ``read_config`` gives the document SIGHUP reloads (the file < environment <
    flags, merged as at startup); ``bpfpipe run`` sets it. ``listeners`` take the
    whole new config when one applies (e.g. ``HealthMonitor.update``); ``metrics``
    gets ``enhanced`` set."""

    config: Config
    read_config: Callable[[], Mapping[str, Any]] | None = None
    enforcer: ResourceEnforcer | None = None
    metrics: object = None
    listeners: list[Callable[[Config], None]] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    pipeline: Pipeline | None = None

    def __post_init__(self) -> None:
        self._document = _document(self.config)
        self._version = 1
        self._failures = 0
        self._reloads = 0
        self._switches = 0
        self._last_error = ""
        self._last_reload_unix = self.clock()
        self._lock = trio.Lock()
        self._specs: list[NodeSpec] = []

    def bind(self, pipeline: Pipeline) -> None:
        """Reload ``pipeline`` (``build_agent`` does this)."""
        self.pipeline = pipeline
        # What the running nodes were built or last reconfigured with (a node reconfigured
        # in place runs with another config than the spec the pipeline built it from).
        self._specs = list(pipeline.specs)

    # -- the four operations --------------------------------------------------------------
    def effective(self) -> dict[str, Any]:
        """``{"version": n, "config": {...}}``: what runs now (stage tables as given,
        before resolution; ``bpfpipe check`` shows them resolved)."""
        return {"version": self._version, "config": copy.deepcopy(self._document)}

    def statistics(self) -> ReloadStatistics:
        return ReloadStatistics(
            version=self._version,
            failures=self._failures,
            last_reload_unix=self._last_reload_unix,
            last_error=self._last_error,
            reloads=self._reloads,
            switches=self._switches,
        )

    async def reload_file(self) -> ReloadResult:
        """SIGHUP: re-read the config file (+ environment + flags) and apply it."""
        started = time.perf_counter()
        async with self._lock:
            try:
                if self.read_config is None:
                    raise ConfigError("", "no config source to re-read")
                candidate = dict(self.read_config())
            except ConfigError as exc:
                return self._fail(str(exc), "SIGHUP", started)
            return await self._reload(candidate, "SIGHUP", started)

    async def apply_document(self, partial: Mapping[str, Any]) -> ReloadResult:
        """``POST /admin/config``: ``partial`` deep-merged over the effective config."""
        started = time.perf_counter()
        async with self._lock:
            return await self._reload(merge(self._document, partial), "admin API", started)

    # -- the transaction ------------------------------------------------------------------
    async def _reload(self, candidate_raw: Mapping[str, Any], trigger: str, started: float) -> ReloadResult:
        from ._build import build_specs

        pipe = self.pipeline
        try:
            if pipe is None or not pipe.started or pipe.stopping:
                raise _Failed(NOT_RUNNING)
            candidate = decode_config(candidate_raw)
            build_specs(candidate)  # every stage resolved, as at startup
            source_live = live_fields(pipe.nodes[0], source=True)
            plan = plan_reload(self._document, _document(candidate), source_live)
            if not plan.applied:
                return self._succeed(plan, False, None, trigger, started)
            effective = decode_config(plan.effective)
            specs, capacities = build_specs(effective)
        except (ConfigError, _Failed) as exc:
            return self._fail(str(exc), trigger, started)
        chain = plan_chain(
            self._specs,
            [e.capacity for e in pipe.edges],
            specs,
            capacities,
            lambda i: live_fields(pipe.nodes[i], source=i == 0),
        )
        previous = self.config
        switch_record: dict[str, Any] | None = None
        in_place = [i for i in chain.reconfigure if i == 0 or not chain.switch]
        pipe.settings = effective  # the new chain's contexts take the new settings
        done: list[tuple[Reconfigurable, Any]] = []
        try:
            for i in in_place:
                node = pipe.nodes[i]
                assert isinstance(node, Reconfigurable)
                node.reconfigure(specs[i].config)
                done.append((node, self._specs[i].config))
            if chain.switch:
                switch_record = (await pipe.replace_chain(specs[1:], capacities)).as_dict()
        except Exception as exc:
            pipe.settings = previous
            _undo(done)
            what = str(exc) if isinstance(exc, BpfpipeError) else f"{type(exc).__name__}: {exc}"
            return self._fail(what, trigger, started)
        if chain.switch:
            self._specs = [self._specs[0], *specs[1:]]
            self._switches += 1
        for i in in_place:  # what the nodes run with now: the next reload diffs against it
            self._specs[i] = specs[i]
        self._apply_settings(effective)
        self.config = effective
        self._document = plan.effective
        self._version += 1
        return self._succeed(plan, chain.switch, switch_record, trigger, started)

    def _apply_settings(self, config: Config) -> None:
        """The agent-wide live settings (they cannot fail)."""
        from ._log import set_log_level

        pipe = self.pipeline
        assert pipe is not None
        for ctx in pipe.contexts:
            ctx.settings = config
        set_log_level("debug" if config.enable_debug else config.log_level)
        pipe.budget.max_events = config.limits.max_inflight_events
        pipe.budget.max_bytes = config.limits.max_inflight_bytes
        if self.enforcer is not None:
            self.enforcer.reconfigure(config.limits)
        if isinstance(self.metrics, _MetricsSwitch):
            self.metrics.enhanced = config.feature_flags.enhanced_metrics
        for listener in self.listeners:
            listener(config)

    # -- outcomes ---------------------------------------------------------------------------
    def _succeed(
        self,
        plan: ReloadPlan,
        switched: bool,
        switch: dict[str, Any] | None,
        trigger: str,
        started: float,
    ) -> ReloadResult:
        self._reloads += 1
        self._last_reload_unix = self.clock()
        result = ReloadResult(
            ok=True,
            version=self._version,
            applied=plan.applied,
            restart_required=plan.restart_required,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            graph_switched=switched,
            chain_switch=switch,
        )
        if plan.restart_required:
            log.warning(
                "config keys need a restart: not applied, running values kept",
                extra={"trigger": trigger, "keys": ",".join(plan.restart_required)},
            )
        extra: dict[str, Any] = {
            "trigger": trigger,
            "version": result.version,
            "applied": ",".join(plan.applied) or "-",
            "duration_ms": result.duration_ms,
        }
        if switch is not None:
            extra["graph_switched"] = True
            extra["inflight_events"] = switch["inflight_events"]
        # The version in the text: each reload is its own line, never folded with the last.
        told = f"config reloaded: version {result.version}" if plan.applied else "config reloaded: no change"
        log.info(told, extra=extra)
        return result

    def _fail(self, error: str, trigger: str, started: float) -> ReloadResult:
        self._failures += 1
        self._last_error = error
        log.error(
            f"config reload failed, running config kept: {error}",  # the same failure again folds
            extra={"trigger": trigger, "version": self._version, "failures": self._failures},
        )
        return ReloadResult(
            ok=False,
            version=self._version,
            applied=[],
            restart_required=[],
            error=error,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
