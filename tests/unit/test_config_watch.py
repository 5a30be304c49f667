"""The config watcher reloads once per settled change, including a kubelet-style ..data swap."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from pipeline._watch import ConfigWatcher, file_identity


def _kubelet_layout(root: Path, text: str, version: int) -> None:
    """What the kubelet does: write ..<version>/, then atomically repoint ..data."""
    data = root / f"..2026_12_02_{version:04d}"
    data.mkdir()
    (data / "bpfpipe.toml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")
    if not (root / "bpfpipe.toml").is_symlink():
        (root / "bpfpipe.toml").symlink_to("..data/bpfpipe.toml")


async def _watch(path: Path, body: object) -> list[str]:
    calls: list[str] = []

    async def on_change() -> None:
        calls.append(path.read_text())

    watcher = ConfigWatcher(str(path), on_change, interval_s=0.01, debounce_s=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        await body()  # type: ignore[operator]
        await trio.sleep(0.8)
        nursery.cancel_scope.cancel()
    return calls


async def test_kubelet_swap_of_the_data_symlink_is_one_reload(tmp_path: Path) -> None:
    _kubelet_layout(tmp_path, "log_level = 'info'\n", 1)
    path = tmp_path / "bpfpipe.toml"

    async def body() -> None:
        await trio.sleep(0.05)
        _kubelet_layout(tmp_path, "log_level = 'debug'\n", 2)

    assert await _watch(path, body) == ["log_level = 'debug'\n"]


async def test_in_place_edit_in_two_writes_is_one_reload(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("a = 1\n")

    async def body() -> None:
        await trio.sleep(0.05)
        with open(path, "w") as f:
            f.write("a = 2\n")
            f.flush()
            await trio.sleep(0.02)  # within the debounce
            f.write("b = 3\n")

    assert await _watch(path, body) == ["a = 2\nb = 3\n"]


async def test_no_change_no_reload_and_a_missing_file_is_waited_out(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("a = 1\n")

    async def body() -> None:
        await trio.sleep(0.05)
        path.unlink()  # mid-swap: nothing to read, no reload
        await trio.sleep(0.05)

    assert await _watch(path, body) == []
    assert file_identity(str(path)) is None
