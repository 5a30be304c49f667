"""Ready-made sources for the BPF programs shipped in ``bpf/``.

Each is a :class:`~stages.reader.RingBufferReader` whose ``program`` defaults to
one of ours, so ``--source exec`` (or ``[source] use = "exec"``) is all it takes.
The graph builder puts the decoder after each of them. The default program names
come from the programs' declarations in ``bpf/programs.py``.
"""

from __future__ import annotations

from bpf.programs import ExecProgram, LoadgenProgram, XdpFirewallProgram
from stages.reader import RingBufferReader, RingBufferReaderConfig


class ExecConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = ExecProgram.program_name


class ExecSource(RingBufferReader):
    """Process exec and exit events from the ``sched`` tracepoints."""

    Config = ExecConfig


class XdpFirewallConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = XdpFirewallProgram.program_name


class XdpFirewallSource(RingBufferReader):
    """Drop events of the XDP firewall; ``options.interface`` names the interface."""

    Config = XdpFirewallConfig


class LoadgenConfig(RingBufferReaderConfig, frozen=True, forbid_unknown_fields=True):
    program: str = LoadgenProgram.program_name


class LoadgenSource(RingBufferReader):
    """The load generator (benchmarks, overload tests): K events per ``getppid()``."""

    Config = LoadgenConfig
