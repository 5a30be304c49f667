"""The capabilities deploy/ grants are enough, and exactly what the error asks for.

``bpfpipe run`` under a bounding set of only CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN
(what deploy/bpfpipe.service and the DaemonSet grant) loads, attaches and reads the
exec program; without CAP_PERFMON it refuses with the one line naming it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
from _cli import BPFPIPE, CLEAN_ENV, NO_SERVERS, assert_accounts_balance

pytestmark = pytest.mark.bpf

GRANTED = {"cap_bpf", "cap_perfmon", "cap_net_admin"}


def _drop_all_but(keep: set[str]) -> list[str]:
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.fail("capsh is missing (Debian: libcap2-bin; scripts/setup-system.sh installs it)")
    printed = subprocess.run([capsh, "--print"], capture_output=True, text=True, check=True).stdout
    bounding = next(line for line in printed.splitlines() if line.startswith("Bounding set ="))
    every = bounding.split("=", 1)[1].split(",")
    assert keep <= set(every), "this test needs to run with the capabilities it keeps"
    drop = ",".join(cap for cap in every if cap not in keep)
    return [capsh, f"--drop={drop}", "--"]


def _run(keep: set[str], seconds: float) -> subprocess.CompletedProcess[str]:
    command = [*BPFPIPE, "run", "--source", "exec", "--sink", "null", "--duration", str(seconds)]
    shell = " ".join(f"'{part}'" for part in command)
    stop = threading.Event()

    def exec_some() -> None:  # exec events for the agent to see while it runs
        while not stop.is_set():
            subprocess.run(["/bin/true"], check=False)
            time.sleep(0.05)

    worker = threading.Thread(target=exec_some, daemon=True)
    worker.start()
    try:
        return subprocess.run(
            [*_drop_all_but(keep), "-c", f"exec {shell}"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**CLEAN_ENV, **NO_SERVERS},
        )
    finally:
        stop.set()
        worker.join()


def test_bpf_perfmon_net_admin_are_enough() -> None:
    proc = _run(GRANTED, 4)
    assert proc.returncode == 0, proc.stderr
    fields = assert_accounts_balance(proc.stderr)
    assert fields.get("outcome_delivered", 0) > 0, proc.stderr


def test_without_perfmon_one_line_names_it() -> None:
    proc = _run(GRANTED - {"cap_perfmon"}, 2)
    assert proc.returncode == 3, proc.stderr
    assert "without CAP_PERFMON" in proc.stderr and "Traceback" not in proc.stderr
