"""Ready-made sources for the BPF programs shipped in ``bpf/``.

Each is a :class:`~stages.reader.RingBufferReader` whose ``program`` defaults to
one of ours, so ``--source exec`` (or ``[source] use = "exec"``) is all it takes.
The graph builder puts the decoder after each of them.
"""

from __future__ import annotations

from stages.reader import RingBufferReader, RingBufferReaderConfig


class ExecConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = "exec"


class ExecSource(RingBufferReader):
    """Process exec and exit events from the ``sched`` tracepoints."""

    Config = ExecConfig


class XdpFirewallConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = "xdp_firewall"


class XdpFirewallSource(RingBufferReader):
    """Drop events of the XDP firewall; ``options.interface`` names the interface."""

    Config = XdpFirewallConfig


class LoadgenConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = "loadgen"


class LoadgenSource(RingBufferReader):
    """The load generator (benchmarks, overload tests): K events per ``getppid()``."""

    Config = LoadgenConfig
