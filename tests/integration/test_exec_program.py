"""The exec program on the real kernel: every spawned process is seen exec'ing and exiting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _bcc_records import BccRecords

from bpf.loader import load_program

pytestmark = pytest.mark.bpf

EVENT_EXEC, EVENT_EXIT = 1, 2  # enum exec_event_type in exec.h
EXIT_CODE_UNKNOWN = -1


class Events(BccRecords):
    """Exec/exit records read with bcc's own ring-buffer consumer."""

    def of(self, type_id: int, pid: int) -> list[np.void]:
        return [r for r in self.records if r["type"] == type_id and r["pid"] == pid]


def test_exec_program_layout() -> None:
    with load_program("exec", ring_buffer_size=64 * 1024, map_size=1024) as program:
        assert program.event_names == {EVENT_EXEC: "exec", EVENT_EXIT: "exit", 255: "heartbeat"}
        exec_dtype, exit_dtype = program.event_types[EVENT_EXEC], program.event_types[EVENT_EXIT]
        assert exec_dtype.names == (
            "type", "cpu", "rate", "ts_ns", "pid", "ppid", "uid", "filename_len", "comm", "filename",
        )  # fmt: skip
        assert exit_dtype.names == (
            "type", "cpu", "rate", "ts_ns", "pid", "ppid", "uid", "exit_code", "lifetime_ns", "comm",
        )  # fmt: skip
        assert exec_dtype["comm"] == np.dtype("S16") and exec_dtype["filename"] == np.dtype("S256")
        assert exit_dtype["exit_code"] == np.dtype("<i4")
        # Mixed record sizes in one ring: the decoder must read the type first.
        assert exec_dtype.itemsize == 304 and exit_dtype.itemsize == 56
        assert program.header_dtype.names == ("type", "cpu", "rate", "ts_ns")
        assert program.header_dtype.itemsize == 16
        assert {a.attach_point for a in program.attachments} == {
            "tracepoint:sched:sched_process_fork",
            "tracepoint:sched:sched_process_exec",
            "tracepoint:sched:sched_process_exit",
            "tracepoint:syscalls:sys_enter_exit_group",
            "tracepoint:syscalls:sys_enter_getpriority",  # bpfpipe.h's heartbeat
        }


def test_spawned_processes_are_seen_with_comm_filename_and_exit_code() -> None:
    python = Path(sys.executable)
    children = [
        # argv, comm, filename, exit code
        (["/bin/sh", "-c", "exit 7"], b"sh", b"/bin/sh", 7),
        (["/bin/true"], b"true", b"/bin/true", 0),
        ([str(python), "-c", "import sys; sys.exit(3)"], python.name.encode()[:15], bytes(python), 3),
        # A second thread exits too; only the process reports an exit event.
        (
            [str(python), "-c", "import os, threading; t = threading.Thread(target=len, args=('x',)); "
             "t.start(); t.join(); os._exit(5)"],
            python.name.encode()[:15], bytes(python), 5,
        ),
        # Killed by a signal: no exit_group(2), so the code is unknown.
        (["/bin/sh", "-c", "kill -9 $$"], b"sh", b"/bin/sh", EXIT_CODE_UNKNOWN),
    ]  # fmt: skip
    with load_program("exec", ring_buffer_size=1 << 20, map_size=4096) as program:
        events = Events(program)
        pids = []
        for argv, *_ in children:
            child = subprocess.Popen(argv)
            child.wait()
            pids.append(child.pid)

        def all_seen() -> bool:
            return all(events.of(EVENT_EXEC, pid) and events.of(EVENT_EXIT, pid) for pid in pids)

        events.poll_until(all_seen)
        for pid, (argv, comm, filename, exit_code) in zip(pids, children, strict=True):
            (exec_event,) = events.of(EVENT_EXEC, pid)
            (exit_event,) = events.of(EVENT_EXIT, pid)
            assert exec_event["comm"] == comm, argv
            assert exec_event["filename"] == filename, argv
            assert exec_event["filename_len"] == len(filename)
            assert exec_event["ppid"] == os.getpid(), argv
            assert exec_event["uid"] == os.getuid()
            assert exec_event["rate"] == 1
            assert exit_event["comm"] == comm, argv
            assert exit_event["exit_code"] == exit_code, argv
            assert exit_event["ppid"] == os.getpid()
            assert exit_event["uid"] == os.getuid()
            assert exit_event["lifetime_ns"] > 0
            assert exit_event["ts_ns"] - exit_event["lifetime_ns"] < exec_event["ts_ns"] < exit_event["ts_ns"]

        # Exiting processes leave nothing behind in the lineage map.
        tracked = {int(key.value) for key in program.bpf[b"exec_procs"]}
        assert tracked.isdisjoint(pids)
        # (The conservation law is checked exactly in test_sampling_gate, where
        # nothing else produces events; here other processes may be mid-flight.)
        stats = program.kernel_stats()
        assert stats["emitted"] >= 2 * len(pids)
        assert stats["errors"] == 0
