"""Each missing BPF prerequisite gives one line naming it, the fix, and the synthetic fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpf.environment import (
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    check_bpf_environment,
    find_missing_prerequisite,
)
from pipeline.errors import BpfpipeError, BpfUnavailableError

RELEASE = "6.99.0-test"
ALL_CAPS = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_ADMIN)


def _status(tmp_path: Path, caps: int) -> Path:
    path = tmp_path / "status"
    path.write_text(
        f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{caps:016x}\nCapBnd:\t000001ffffffffff\n"
    )
    return path


def _bcc_ok() -> object:
    return object()


def _bcc_missing() -> object:
    raise ImportError("No module named 'bcc'")


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, object]:
    """A machine where everything is present; tests take one thing away."""
    (tmp_path / "modules" / RELEASE / "build" / "include").mkdir(parents=True)
    (tmp_path / "tracing" / "events").mkdir(parents=True)
    return {
        "euid": 0,
        "proc_status": _status(tmp_path, ALL_CAPS),
        "import_bcc": _bcc_ok,
        "release": RELEASE,
        "modules_dir": tmp_path / "modules",
        "tracefs_dirs": [tmp_path / "tracing", tmp_path / "debug" / "tracing"],
    }


def _message(**machine: object) -> str:
    with pytest.raises(BpfUnavailableError) as info:
        check_bpf_environment(**machine)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert "--source synthetic" in message
    assert info.value.exit_code == 3
    assert isinstance(info.value, BpfpipeError)
    return message


def test_complete_machine_passes(machine: dict[str, object]) -> None:
    check_bpf_environment(**machine)  # type: ignore[arg-type]
    assert find_missing_prerequisite(**machine) is None  # type: ignore[arg-type]


def test_not_root(machine: dict[str, object], tmp_path: Path) -> None:
    message = _message(**{**machine, "euid": 1000, "proc_status": _status(tmp_path, 0)})
    assert "not running as root" in message
    assert "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)" in message


def test_root_without_cap_perfmon(machine: dict[str, object], tmp_path: Path) -> None:
    message = _message(**{**machine, "proc_status": _status(tmp_path, 1 << CAP_BPF)})
    assert "running as root without CAP_PERFMON" in message
    assert "CAP_BPF" not in message.split("(")[0]


@pytest.mark.parametrize(
    "caps",
    [(1 << CAP_BPF) | (1 << CAP_PERFMON), 1 << CAP_SYS_ADMIN],
    ids=["bpf+perfmon", "sys_admin"],
)
def test_either_capability_set_is_enough(machine: dict[str, object], tmp_path: Path, caps: int) -> None:
    assert find_missing_prerequisite(**{**machine, "proc_status": _status(tmp_path, caps)}) is None  # type: ignore[arg-type]


def test_unreadable_capabilities_count_as_missing(machine: dict[str, object], tmp_path: Path) -> None:
    message = _message(**{**machine, "proc_status": tmp_path / "no-such-status"})
    assert "without CAP_BPF+CAP_PERFMON" in message


def test_bcc_not_importable(machine: dict[str, object]) -> None:
    message = _message(**{**machine, "import_bcc": _bcc_missing})
    assert "bcc is not importable (No module named 'bcc')" in message
    assert "sudo make setup" in message


def test_no_kernel_headers(machine: dict[str, object], tmp_path: Path) -> None:
    message = _message(**{**machine, "release": "7.0.0-other"})
    assert f"no kernel headers at {tmp_path / 'modules' / '7.0.0-other' / 'build'}" in message
    assert "sudo make setup" in message


def test_dangling_headers_link_counts_as_missing(machine: dict[str, object], tmp_path: Path) -> None:
    release_dir = tmp_path / "modules" / "7.0.0-dangling"
    release_dir.mkdir(parents=True)
    (release_dir / "build").symlink_to(tmp_path / "removed-headers")
    message = _message(**{**machine, "release": "7.0.0-dangling"})
    assert "no kernel headers at" in message


def test_tracefs_not_mounted(machine: dict[str, object], tmp_path: Path) -> None:
    message = _message(**{**machine, "tracefs_dirs": [tmp_path / "unmounted"]})
    assert f"tracefs is not mounted at {tmp_path / 'unmounted'}" in message
    assert "sudo make setup" in message


def test_first_missing_prerequisite_wins(machine: dict[str, object], tmp_path: Path) -> None:
    message = _message(
        **{**machine, "euid": 1000, "proc_status": _status(tmp_path, 0), "import_bcc": _bcc_missing}
    )
    assert "not running as root" in message
    assert "bcc" not in message
