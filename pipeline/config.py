"""Typed configuration: defaults < TOML file < environment < command-line flags.

Every section is a ``msgspec.Struct`` that forbids unknown fields, so a typo is
an error (with a did-you-mean) rather than a silently ignored key. Errors are
:class:`~pipeline.errors.ConfigError` whose message starts with the key path,
e.g. ``metrics_port: expected int, got "abc"``.

Stage configs (``[stages.config]``) are kept as plain tables here and decoded
into each stage's own ``Config`` struct when the graph is built (see
``pipeline._registry``), so third-party stages get the same error quality.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import tomllib
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import tomli_w

from .errors import ConfigError

__all__ = [
    "NOT_YET_USED",
    "ChannelsConfig",
    "Config",
    "FeatureFlags",
    "FleetConfig",
    "HealthConfig",
    "LimitsConfig",
    "NodeConfig",
    "ShutdownConfig",
    "dump_config",
    "env_overrides",
    "load_config",
    "merge",
    "merge_sources",
    "read_toml",
]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class FeatureFlags(_Section, frozen=True):
    new_parser: bool = False
    enhanced_metrics: bool = False


class NodeConfig(_Section, frozen=True):
    """One element of the chain. ``use`` is a built-in name (``synthetic``,
    ``jsonl``, ``null``, ``noop``, …), an entry point in the ``bpfpipe.stages``
    group, or an import path ``package.module:Class``."""

    use: str
    name: str = ""
    capacity: Positive | None = None
    """Capacity, in batches, of the channel *into* this node (default: channels.capacity)."""
    config: dict[str, Any] = {}


class ChannelsConfig(_Section, frozen=True):
    capacity: Positive = 16
    """Default capacity of every channel, in batches."""


class LimitsConfig(_Section, frozen=True):
    max_inflight_events: NonNegative = 1_048_576
    """Events admitted into the user-space pipeline and not yet given an outcome (0 = unbounded)."""
    max_inflight_bytes: NonNegative = 64 * 1024 * 1024
    """Bytes of batch arrays in flight (0 = unbounded)."""
    max_events_per_sec: NonNegative = 1_000_000
    """Cap on events delivered per second; the adaptive sampler enforces it (0 = no cap)."""
    max_memory_mb: NonNegative = 256
    """Resident memory past which sources drain their ring buffers instead of waiting (0 = off)."""
    max_map_entries: NonNegative = 65536
    """Entries past which growing BPF maps are trimmed, oldest first (0 = off)."""
    enforce_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """How often the resource enforcer checks memory and maps."""


class ShutdownConfig(_Section, frozen=True):
    drain_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    """How long a graceful stop may drain; past it the pipeline aborts and what is
    still in flight is recorded as dropped (reason ``shutdown``)."""
    metrics_snapshot_file: str = ""
    """Where the final metrics snapshot (Prometheus text format) is written on stop,
    besides the log ("" = the log only)."""


class HealthConfig(_Section, frozen=True):
    """The readiness checks (``/health/ready`` on ``health_check_port``)."""

    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    """How often the agent makes a heartbeat event at its source (0 < s)."""
    heartbeat_deadline_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 15.0
    """A heartbeat not seen leaving the last stage within this long fails the check."""
    ringbuf_usage_limit_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] = 90.0
    """Ring-buffer usage at or above this fails the (non-critical) ring-buffer check."""


FLEET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A fleet node or bucket name: one key-value key token (no dots, no wildcards)."""


class FleetConfig(_Section, frozen=True):
    """Fleet policy from a NATS JetStream key-value bucket (``pipeline.fleet``)."""

    servers: list[str] = []
    """NATS server URLs (``nats://host:4222``); empty: no fleet policy."""
    bucket: str = "bpfpipe-policy"
    node: str = ""
    """This agent's name in the fleet (its override key ``node.<name>``); "": the host name."""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0

    def __post_init__(self) -> None:
        for i, url in enumerate(self.servers):
            scheme, sep, rest = url.partition("://")
            if not (rest if sep else scheme) or (sep and scheme not in ("nats", "tls")):
                raise ConfigError(
                    f"fleet.servers[{i}]",
                    f"expected a NATS URL such as nats://host:4222, got {json.dumps(url)}",
                )
        if not FLEET_NAME.match(self.bucket):
            raise ConfigError(
                "fleet.bucket", f"expected letters, digits, - and _, got {json.dumps(self.bucket)}"
            )
        if self.node and not FLEET_NAME.match(self.node):
            raise ConfigError(
                "fleet.node", f"expected 1-64 letters, digits, - and _ (no dots), got {json.dumps(self.node)}"
            )


Bind = Annotated[str, msgspec.Meta(min_length=1)]
"""An IP address to listen on (``0.0.0.0`` all IPv4, ``::`` all IPv6 and IPv4, ``127.0.0.1`` loopback)."""


class Config(_Section, frozen=True):
    log_level: LogLevel = "info"
    metrics_port: Port = 9090
    """Prometheus ``/metrics`` (0 = no metrics server)."""
    metrics_bind: Bind = "0.0.0.0"
    health_check_port: Port = 8080
    """``/health/live``, ``/health/ready`` and the read-only ``/status`` (0 = no health server)."""
    health_bind: Bind = "0.0.0.0"
    admin_port: Port = 8081
    """The admin API: state-changing endpoints (``/admin/...``); 0 = no admin server."""
    admin_bind: Bind = "127.0.0.1"
    """Loopback by default; any other address requires ``admin_token_file``."""
    admin_token_file: str = ""
    """A file holding the bearer token the admin API requires (when set, also on loopback)."""
    watch_config: bool = True
    """Reload when the config file changes (a Kubernetes ConfigMap swap, an editor's save);
    the same validated reload as SIGHUP. Only when started with a config file."""
    bpf_map_size: Positive = 65536
    ring_buffer_size: Positive = 262144
    enable_debug: bool = False
    feature_flags: FeatureFlags = FeatureFlags()
    source: NodeConfig = NodeConfig(use="exec")
    stages: list[NodeConfig] = []
    sink: NodeConfig = NodeConfig(use="jsonl")
    channels: ChannelsConfig = ChannelsConfig()
    limits: LimitsConfig = LimitsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    health: HealthConfig = HealthConfig()
    fleet: FleetConfig = FleetConfig()

    def __post_init__(self) -> None:
        for key in ("metrics_bind", "health_bind", "admin_bind"):
            value = getattr(self, key)
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(
                    key, f"expected an IP address to listen on, got {json.dumps(value)}"
                ) from None
        if (
            self.admin_port
            and not self.admin_token_file
            and not ipaddress.ip_address(self.admin_bind).is_loopback
        ):
            raise ConfigError(
                "admin_bind",
                f"{self.admin_bind} exposes the admin API beyond loopback; set admin_token_file"
                " (a bearer token is required there) or bind 127.0.0.1",
            )
        ports = [(k, getattr(self, k)) for k in ("metrics_port", "health_check_port", "admin_port")]
        used = [(k, p) for k, p in ports if p]
        for i, (key, port) in enumerate(used):
            for other, port2 in used[:i]:
                if port == port2:
                    raise ConfigError(key, f"{port} is also {other}; each server needs its own port")


# --- environment ---------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} (environment)", f"expected a boolean (1/0, true/false), got {value!r}")


def _env_int(name: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{name} (environment)", f"expected int, got {json.dumps(value)}") from None


_ENV_PORTS = {
    "METRICS_PORT": "metrics_port",
    "HEALTH_CHECK_PORT": "health_check_port",
    "ADMIN_PORT": "admin_port",
}


def env_overrides(environ: Mapping[str, str], *, skip: Collection[str] = ()) -> dict[str, Any]:
    """The config keys set by ``BPF_LOG_LEVEL``, ``METRICS_PORT``, ``HEALTH_CHECK_PORT``,
    ``ADMIN_PORT`` and ``BPF_DEBUG``, except
    those in ``skip`` (set by flags, which win: a bad value they override is not an error)."""
    out: dict[str, Any] = {}
    if "BPF_LOG_LEVEL" in environ and "log_level" not in skip:
        out["log_level"] = environ["BPF_LOG_LEVEL"].strip().lower()
    for var, key in _ENV_PORTS.items():
        if var in environ and key not in skip:
            out[key] = _env_int(var, environ[var])
    if "BPF_DEBUG" in environ and "enable_debug" not in skip:
        out["enable_debug"] = _env_bool("BPF_DEBUG", environ["BPF_DEBUG"])
    return out


# --- loading -------------------------------------------------------------------------


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge tables; values (including lists) in ``override`` replace ``base``'s."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


MAX_CONFIG_BYTES = 1024 * 1024
"""Config files are read up to this size; a larger one is an error, not a slow hang."""
MAX_CONFIG_DEPTH = 32
"""Tables and arrays nest at most this deep (no real config comes close)."""

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file: UTF-8 (a leading BOM is accepted), at most :data:`MAX_CONFIG_BYTES`,
    nested at most :data:`MAX_CONFIG_DEPTH` deep. Every failure is a one-line ConfigError."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(where, "config file is larger than 1 MiB, the limit; is it the right file?")
    if data.startswith(_UTF16_BOMS):
        raise ConfigError(where, "config file is UTF-16; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"config file is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
        raise ConfigError(where, problem) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(where, f"nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    if (deep := _too_deep(raw, MAX_CONFIG_DEPTH)) is not None:
        raise ConfigError(_join("", deep), f"nested more than {MAX_CONFIG_DEPTH} levels deep")
    return raw


def _too_deep(value: Any, budget: int, keys: tuple[str | int, ...] = ()) -> list[str | int] | None:
    """The key path where ``value`` nests deeper than ``budget``, or None."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    if budget <= 0:
        return list(keys)
    for key, item in items:
        if (found := _too_deep(item, budget - 1, (*keys, key))) is not None:
            return found
    return None


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config: defaults < file < environment < ``overrides`` (CLI)."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    return decode_config(merge_sources(raw, environ=environ, overrides=overrides))


def merge_sources(
    raw: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``raw`` (the file's tables) < environment < ``overrides``; an environment
    variable whose key ``overrides`` sets is not read at all."""
    out = dict(raw)
    if environ is not None:
        out = merge(out, env_overrides(environ, skip=set(overrides or ())))
    if overrides:
        out = merge(out, overrides)
    return out


def decode_config(raw: Mapping[str, Any]) -> Config:
    try:
        return msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise config_error_from(exc, raw, Config) from None


NOT_YET_USED: dict[str, str] = {}
"""Keys the config accepts that nothing reads yet, and why; ``bpfpipe check`` says so
beside each. A key leaves this table in the change that makes something read it."""


def dump_config(config: Config, *, annotate: bool = False) -> str:
    """The config as TOML that :func:`load_config` reads back to an equal config; with
    ``annotate``, keys in :data:`NOT_YET_USED` get a comment saying so."""
    text = tomli_w.dumps(_strip_none(msgspec.to_builtins(config)))
    if not annotate:
        return text
    out, table = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            table = line.strip("[] ")
        elif " = " in line:
            key = line.split(" = ", 1)[0].strip()
            note = NOT_YET_USED.get(f"{table}.{key}" if table else key)
            if note:
                line = f"{line}  # {note}"
        out.append(line)
    return "\n".join(out) + "\n"


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


# --- error messages ------------------------------------------------------------------

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]*)`")


def config_error_from(
    exc: msgspec.ValidationError, raw: Any, root: type[Any], prefix: str = ""
) -> ConfigError:
    """Turn msgspec's message into ``key.path: problem`` with the offending value."""
    match = _AT.match(str(exc))
    assert match is not None
    message, path = match["msg"], (match["path"] or "")
    keys = _parse_path(path)
    if unknown := _UNKNOWN.match(message):
        field = unknown["field"]
        problem = "unknown key"
        options = _field_names(_type_at(root, keys))
        close = difflib.get_close_matches(field, options, n=1, cutoff=0.6)
        if close:
            problem += f" (did you mean {close[0]!r}?)"
        return ConfigError(_join(prefix, [*keys, field]), problem)
    if missing := _MISSING.match(message):
        return ConfigError(_join(prefix, [*keys, missing["field"]]), "required key is missing")
    problem = message.replace("`", "")
    problem = problem[:1].lower() + problem[1:]
    found, value = _value_at(raw, keys)
    choices = typing.get_args(_type_at(root, keys)) if problem.startswith("invalid enum value") else ()
    if choices:
        return ConfigError(
            _join(prefix, keys), f"expected one of {', '.join(map(_show, choices))}, got {_show(value)}"
        )
    if found and problem.startswith("expected") and ", got" in problem:
        problem = problem.split(", got", 1)[0] + f", got {_show(value)}"
    elif found and not problem.startswith("expected"):
        problem += f" (got {_show(value)})"
    elif found:
        problem += f", got {_show(value)}"
    return ConfigError(_join(prefix, keys), problem)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _parse_path(path: str) -> list[str | int]:
    keys: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        keys.append(int(index) if index else name)
    return keys


def _join(prefix: str, keys: list[str | int]) -> str:
    out = prefix
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out = f"{out}.{key}" if out else key
    return out


def _value_at(raw: Any, keys: list[str | int]) -> tuple[bool, Any]:
    value = raw
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, value


def _type_at(root: Any, keys: list[str | int]) -> Any:
    tp = root
    for key in keys:
        tp = _strip_annotations(tp)
        if isinstance(key, int):
            args = typing.get_args(tp)
            tp = args[0] if args else Any
        elif isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = typing.get_type_hints(tp).get(key, Any)
        else:
            return Any
    return _strip_annotations(tp)


def _strip_annotations(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            non_none = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(non_none) != 1:
                return tp
            tp = non_none[0]
        else:
            return tp


def _field_names(tp: Any) -> list[str]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return list(tp.__struct_fields__)
    return []
