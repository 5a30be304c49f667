"""The loader: one-line errors quoting the compiler and verifier, sizing, lifecycle."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from bpf.attach import AttachedXdp, stale_xdp_problem
from bpf.loader import (
    DEFAULT_MAP_SIZE,
    DEFAULT_RING_BUFFER_PAGES,
    MAX_MAP_SIZE,
    MIN_MAP_SIZE,
    BpfLoadError,
    ExecProgram,
    LoadgenProgram,
    available_programs,
    clamp_map_size,
    load_program,
    ring_buffer_pages,
)
from bpf.programs import STAT_NAMES
from pipeline.errors import BpfUnavailableError, ConfigError

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_GET_FD_BY_ID = 13


def prog_exists(prog_id: int) -> bool:
    """Ask the kernel whether a program id is still loaded (BPF_PROG_GET_FD_BY_ID)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 3)(prog_id, 0, 0)
    fd = libc.syscall(_BPF_SYSCALL[platform.machine()], _BPF_PROG_GET_FD_BY_ID, attr, ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    assert ctypes.get_errno() == errno.ENOENT, os.strerror(ctypes.get_errno())
    return False


def ring_max_entries(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("max_entries:"):
            return int(line.split()[1])
    raise AssertionError("no max_entries in fdinfo")


def write_program(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.bpf.c").write_text(textwrap.dedent(source))


# -- pure sizing rules (no kernel) ----------------------------------------------------


def test_ring_buffer_pages_round_up_to_a_power_of_two() -> None:
    assert ring_buffer_pages(1, 4096) == 1
    assert ring_buffer_pages(4096, 4096) == 1
    assert ring_buffer_pages(4097, 4096) == 2
    assert ring_buffer_pages(5 * 4096, 4096) == 8
    assert ring_buffer_pages(1 << 40, 4096) == 1 << 18
    with pytest.raises(ValueError, match="positive"):
        ring_buffer_pages(0, 4096)


def test_map_size_is_clamped() -> None:
    assert clamp_map_size(1) == MIN_MAP_SIZE
    assert clamp_map_size(5000) == 5000
    assert clamp_map_size(1 << 30) == MAX_MAP_SIZE
    with pytest.raises(ValueError, match="positive"):
        clamp_map_size(-1)


def test_packaged_programs() -> None:
    assert available_programs() == ["exec", "loadgen", "xdp_firewall"]


def test_unknown_program_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"no BPF program 'nope' .*available: exec, loadgen, xdp_firewall"
    ) as info:
        load_program("nope", ring_buffer_size=4096, map_size=1024)
    assert info.value.path == "program"


# -- against the kernel ---------------------------------------------------------------


@pytest.mark.bpf
def test_verifier_rejection_quotes_the_verifier(tmp_path: Path) -> None:
    write_program(
        tmp_path,
        "unchecked_lookup",
        """\
        #include "bpfpipe.h"
        BPF_HASH(counts, u32, u64, 16);
        TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
        {
            u32 key = 1;
            u64 *value = counts.lookup(&key);
            *value += 1; /* no NULL check: the verifier must refuse */
            return 0;
        }
        """,
    )
    with pytest.raises(BpfLoadError) as info:
        load_program("unchecked_lookup", ring_buffer_size=4096, map_size=1024, source_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("BPF program 'unchecked_lookup' was rejected by the kernel verifier")
    assert "tracepoint__syscalls__sys_enter_getppid" in message
    assert "invalid mem access 'map_value_or_null'" in message
    assert info.value.exit_code == 3
    assert isinstance(info.value, BpfUnavailableError)


@pytest.mark.bpf
def test_unchecked_packet_access_is_rejected_before_attaching(tmp_path: Path) -> None:
    write_program(
        tmp_path,
        "unchecked_packet",
        """\
        #include "bpfpipe.h"
        int unchecked_packet(struct xdp_md *ctx)
        {
            unsigned char *data = (void *)(long)ctx->data;
            return data[20] == 6 ? XDP_DROP : XDP_PASS; /* no data_end check */
        }
        """,
    )
    with pytest.raises(BpfLoadError) as info:
        load_program(
            "unchecked_packet",
            ring_buffer_size=4096,
            map_size=1024,
            options={"interface": "lo"},
            source_dir=tmp_path,
        )
    message = str(info.value)
    assert "\n" not in message
    assert "'unchecked_packet' was rejected by the kernel verifier (unchecked_packet: Permission denied)" in (
        message
    )
    assert "invalid access to packet" in message


@pytest.mark.bpf
def test_compile_error_names_file_line_and_clang_words(tmp_path: Path) -> None:
    write_program(
        tmp_path,
        "typo",
        """\
        #include "bpfpipe.h"

        TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
        {
            return no_such_thing;
        }
        """,
    )
    with pytest.raises(BpfLoadError) as info:
        load_program("typo", ring_buffer_size=4096, map_size=1024, source_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("BPF program 'typo' failed to compile: ")
    # #line markers keep the user's file and line despite the inlined headers.
    assert f"{tmp_path / 'typo.bpf.c'}:5:" in message
    assert "error: use of undeclared identifier 'no_such_thing'" in message


@pytest.mark.bpf
def test_xdp_program_without_interface_is_a_config_error() -> None:
    # Paths are relative to the source's config table (the graph builder prefixes its own).
    with pytest.raises(ConfigError, match=r"^options\.interface: .*name the interface"):
        load_program("xdp_firewall", ring_buffer_size=4096, map_size=1024)
    with pytest.raises(ConfigError, match=r"^options\.mode: must be one of skb, driver"):
        load_program(
            "xdp_firewall", ring_buffer_size=4096, map_size=1024, options={"interface": "lo", "mode": "hw"}
        )
    with pytest.raises(ConfigError, match=r"^options\.interface: program 'loadgen' has no such option"):
        load_program("loadgen", ring_buffer_size=4096, map_size=1024, options={"interface": "lo"})


@pytest.mark.bpf
def test_ring_size_rounding_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    with (
        caplog.at_level(logging.WARNING, logger="bpfpipe.bpf"),
        load_program("loadgen", ring_buffer_size=5 * page, map_size=1024) as program,
    ):
        assert program.ring_size_bytes == 8 * page
        assert ring_max_entries(program.ring_map_fd) == 8 * page
    warnings = [r for r in caplog.records if r.name == "bpfpipe.bpf" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{5 * page} bytes" in warnings[0].getMessage()
    assert f"{8 * page} bytes (8 pages)" in warnings[0].getMessage()

    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="bpfpipe.bpf"),
        load_program("loadgen", ring_buffer_size=4 * page, map_size=1024) as program,
    ):
        assert ring_max_entries(program.ring_map_fd) == 4 * page
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.bpf
def test_close_detaches_and_is_idempotent() -> None:
    program = load_program("loadgen", ring_buffer_size=4096, map_size=1024)
    assert isinstance(program, LoadgenProgram)
    attachment, heartbeat = sorted(program.attachments, key=lambda a: a.attach_point)
    assert heartbeat.attach_point == "tracepoint:syscalls:sys_enter_getpriority"  # bpfpipe.h's heartbeat
    assert attachment.function == "tracepoint__syscalls__sys_enter_getppid"
    assert attachment.attach_point == "tracepoint:syscalls:sys_enter_getppid"
    assert prog_exists(attachment.prog_id)

    program.configure_loadgen(os.getpid(), 1)
    os.getppid()
    assert program.kernel_stats()["emitted"] == 1

    program.close()
    program.close()
    assert program.closed
    with pytest.raises(RuntimeError, match="is closed"):
        program.kernel_stats()
    # The kernel frees a detached program after an RCU grace period.
    deadline = time.monotonic() + 5
    while prog_exists(attachment.prog_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not prog_exists(attachment.prog_id)


@pytest.mark.bpf
def test_detach_stops_events_and_keeps_maps_readable() -> None:
    records: list[int] = []
    with load_program("loadgen", ring_buffer_size=None, map_size=None) as program:
        assert isinstance(program, LoadgenProgram)
        assert program.ring_size_bytes == DEFAULT_RING_BUFFER_PAGES * os.sysconf("SC_PAGE_SIZE")
        assert program.map_size == DEFAULT_MAP_SIZE
        program.configure_loadgen(os.getpid(), 3)
        os.getppid()
        program.detach()
        program.detach()
        assert program.detached and not program.closed
        os.getppid()  # no longer observed
        assert program.kernel_stats()["events"] == 3
        program.bpf[b"events"].open_ring_buffer(lambda _ctx, _data, size: records.append(size) or 0)
        program.bpf.ring_buffer_consume()
        for attachment in program.attachments:
            assert prog_exists(attachment.prog_id)  # loaded, just not attached
    assert records == [32, 32, 32]
    assert program.closed


@pytest.mark.bpf
def test_growing_maps_are_counted_and_evicted_oldest_first() -> None:
    with load_program("exec", ring_buffer_size=None, map_size=None) as program:
        assert isinstance(program, ExecProgram)
        assert list(program.growing_maps()) == ["exec_procs"]
        sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
        try:
            table = program.bpf[b"exec_procs"]
            assert {sleeper.pid for sleeper in sleepers} <= {int(key.value) for key in table}
            assert program.growing_maps()["exec_procs"] >= 3
            # Oldest by struct exec_proc.start_ns (exec.h). Other processes may fork or exit
            # meanwhile, so compare with a snapshot: of its entries, only the newest may remain.
            snapshot = sorted(table.items(), key=lambda item: int(item[1].start_ns))
            assert program.evict_oldest("exec_procs", keep=1) >= 2
            remaining = {int(key.value) for key in table}
            assert remaining & {int(key.value) for key, _ in snapshot} <= {int(snapshot[-1][0].value)}
            assert program.evict_oldest("exec_procs", keep=len(table) + 10) == 0
            with pytest.raises(KeyError, match="not a growing map of program 'exec'"):
                program.evict_oldest("bpfpipe_stats", keep=0)
        finally:
            for sleeper in sleepers:
                sleeper.kill()
                sleeper.wait()


# -- a stale XDP attachment: whose is it? (pure; no kernel) ---------------------------

OURS = AttachedXdp(prog_id=7, name="xdp_firewall", tag="0e293ce5333d86ad", mode="skb")


@pytest.mark.parametrize(
    ("attached", "holders", "expected"),
    [
        (OURS, [], None),
        (AttachedXdp(7, "xdp_firewall", "0e293ce5333d86ad", "driver"), [], None),
        (
            OURS,
            [4242],
            "already attached (prog id 7, name 'xdp_firewall', tag 0e293ce5333d86ad, skb mode) "
            "and held open by running process 4242; stop that bpfpipe first",
        ),
        (AttachedXdp(7, "xdp_firewall", "ffffffffffffffff", "skb"), [], "same name but a different tag"),
        (AttachedXdp(7, "foreign", "0e293ce5333d86ad", "driver"), [], "not bpfpipe's"),
        (AttachedXdp(7, "", "", "skb"), [], "name '?', tag ?, skb mode): iproute2 does not say its name"),
        (AttachedXdp(7, "xdp_firewall", "0e293ce5333d86ad", "hw"), [], "a mode bpfpipe does not use"),
    ],
    ids=["stale", "stale-other-mode", "running", "other-build", "foreign", "unknown", "offloaded"],
)
def test_only_our_own_unheld_program_is_stale(
    attached: AttachedXdp, holders: list[int], expected: str | None
) -> None:
    problem = stale_xdp_problem(
        attached, interface="veth0", function="xdp_firewall", tag="0e293ce5333d86ad", holders=holders
    )
    if expected is None:
        assert problem is None
        return
    assert problem is not None and expected in problem, problem
    if not holders:
        word = {"skb": "xdpgeneric", "driver": "xdpdrv", "hw": "xdpoffload"}[attached.mode]
        assert problem.endswith(
            f"remove it with `ip link set dev veth0 {word} off` or `bpftool net detach {word} dev veth0`"
        ), problem


@pytest.mark.bpf
def test_kernel_stats_read_in_one_batch_equal_the_per_key_lookups() -> None:
    program = load_program("loadgen", ring_buffer_size=4096, map_size=1024)
    assert isinstance(program, LoadgenProgram)
    try:
        program.configure_loadgen(os.getpid(), 3)
        for _ in range(5):
            os.getppid()
        program.configure_loadgen(0, 0)
        batched = program.kernel_stats_per_cpu()
        assert program._stats_reader is not None and program._stats_reader._batch_works  # one syscall
        table = program.bpf[b"bpfpipe_stats"]
        by_key = [[int(v) for v in table.getvalue(table.Key(i))] for i in range(len(STAT_NAMES))]
        assert batched == [
            {name: by_key[i][cpu] for i, name in enumerate(STAT_NAMES)} for cpu in range(len(batched))
        ]
        totals = program.kernel_stats()
        assert totals["events"] == totals["emitted"] == 15
        assert totals == {name: sum(row) for name, row in zip(STAT_NAMES, by_key, strict=True)}
    finally:
        program.close()
