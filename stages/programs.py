"""Ready-made sources for the BPF programs shipped in ``bpf/``.

Each is a :class:`~stages.reader.RingBufferReader` whose ``program`` defaults to
one of ours, so ``--source exec`` (or ``[source] use = "exec"``) is all it takes.
The graph builder puts the decoder after each of them. The default program names
come from the programs' declarations in ``bpf/programs.py``.
"""

from __future__ import annotations

import functools
import threading
from typing import ClassVar

import pipeline
from bpf.firewall_policy import BlockedPrefixes, PolicyChange, RateLimit, parse_blocked_ips
from bpf.loader import BpfLoadError
from bpf.programs import ExecProgram, LoadgenProgram, XdpFirewallProgram
from pipeline import ConfigError, StageContext
from stages.reader import RingBufferReader, RingBufferReaderConfig, RingProgram


class ExecConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = ExecProgram.program_name


class ExecSource(RingBufferReader):
    """Process exec and exit events from the ``sched`` tracepoints."""

    Config = ExecConfig


class XdpFirewallConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = XdpFirewallProgram.program_name
    blocked_ips: list[str] = []
    """Sources to drop: IPv4/IPv6 addresses and CIDR prefixes (``"10.0.0.5"``,
    ``"192.168.0.0/16"``, ``"2001:db8::/32"``); rules in :mod:`bpf.firewall_policy`."""
    rate_limit: RateLimit = RateLimit()
    """``{ pps, burst }`` per source address (an IPv6 source's /64); ``pps = 0``: off."""


class XdpFirewallSource(RingBufferReader):
    """Drop events of the XDP firewall; ``options.interface`` names the interface.

    The policy (``blocked_ips``, ``rate_limit``) is validated at build time
    (:meth:`resolve_config`: errors name ``blocked_ips[i]``), written into the
    program's maps before the program is attached (so no packet ever meets the
    firewall without it, and the source reports started only after), and changed
    live by :meth:`reconfigure`.
    """

    Config = XdpFirewallConfig
    config: XdpFirewallConfig
    live_config_fields: ClassVar[frozenset[str]] = frozenset({"blocked_ips", "rate_limit"})
    """What :meth:`reconfigure` applies; any other field needs a new program (a restart)."""

    def __init__(self, config: XdpFirewallConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._policy_lock = threading.Lock()
        """Serialises policy writes: the start's (a worker thread) and reconfigure's (trio's)."""
        self._firewall: XdpFirewallProgram | None = None

    @classmethod
    def resolve_config(
        cls, config: RingBufferReaderConfig, settings: pipeline.Config
    ) -> RingBufferReaderConfig:
        """The reader's checks, then the policy's: every ``blocked_ips`` entry, and their
        count per family against the map size the program will get."""
        from bpf.sizing import clamp_map_size

        resolved = super().resolve_config(config, settings)
        assert isinstance(resolved, XdpFirewallConfig)
        _blocked_prefixes(tuple(resolved.blocked_ips), clamp_map_size(resolved.map_size or 1))
        if resolved.program != XdpFirewallProgram.program_name and (
            resolved.blocked_ips or resolved.rate_limit.enabled
        ):
            raise ConfigError(
                "program", f"only {XdpFirewallProgram.program_name!r} takes blocked_ips and rate_limit"
            )
        return resolved

    def _prepare_maps(self, program: RingProgram) -> None:
        """The reader's initial values, then the policy: before the program is attached."""
        super()._prepare_maps(program)
        if not isinstance(program, XdpFirewallProgram):
            return  # another program (no policy: resolve_config saw to that)
        with self._policy_lock:
            try:
                change = self._apply_policy(program, self.config)
            except RuntimeError as exc:  # a map update failed (and was undone): a load failure
                raise BpfLoadError(program.name, f"was not attached: {exc}") from exc
            self._firewall = program
        self.ctx.log.info(
            "firewall policy applied: %s",
            change.summary(),
            extra={"stage": self.ctx.name, "blocked_prefixes": len(change.added)},
        )

    def reconfigure(self, config: XdpFirewallConfig) -> None:
        """Apply a new ``blocked_ips`` and ``rate_limit`` (the only fields this covers,
        :attr:`live_config_fields`) to the running program by difference, without
        detaching it (:meth:`bpf.programs.XdpFirewallProgram.apply_policy`: new prefixes
        are in force before removed ones go). ``config`` is the source's new resolved
        config; a change of any other field raises ``ValueError`` and applies nothing.
        Before the program is loaded it only records the config (the start applies it).
        Blocks the caller for one syscall per blocklist entry (10,000: ~15 ms) and one per
        change; a failed map update is undone and raises ``RuntimeError``."""
        others = {
            name: (getattr(self.config, name), getattr(config, name))
            for name in self.config.__struct_fields__
            if name not in self.live_config_fields
        }
        changed = sorted(name for name, (old, new) in others.items() if old != new)
        if changed:
            raise ValueError(
                f"{', '.join(changed)} cannot change while the source runs (only "
                f"{', '.join(sorted(self.live_config_fields))} can): restart to apply"
            )
        with self._policy_lock:
            if self._firewall is None:
                self.config = config
                return
            change = self._apply_policy(self._firewall, config)
            self.config = config
        self.ctx.log.info("firewall policy changed: %s", change.summary(), extra={"stage": self.ctx.name})

    def _apply_policy(self, program: XdpFirewallProgram, config: XdpFirewallConfig) -> PolicyChange:
        blocked = _blocked_prefixes(tuple(config.blocked_ips), program.map_size)
        return program.apply_policy(blocked, config.rate_limit)


@functools.lru_cache(maxsize=4)
def _blocked_prefixes(blocked_ips: tuple[str, ...], max_entries: int) -> BlockedPrefixes:
    """``parse_blocked_ips``, remembered: a reload validates the new list at build time
    and applies it moments later (10,000 entries take ~0.1 s to parse)."""
    return parse_blocked_ips(blocked_ips, max_entries=max_entries)


class LoadgenConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = LoadgenProgram.program_name


class LoadgenSource(RingBufferReader):
    """The load generator (benchmarks, overload tests): K events per ``getppid()``."""

    Config = LoadgenConfig
