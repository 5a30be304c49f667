"""A config from a mounted ConfigMap reloads itself: the file is a symlink into a ``..data``
directory, the test swaps it as the kubelet does, and the running agent applies the new
version on its own (no signal) and reports it; a broken swap is rejected and counted.

The latency (swap -> version visible on ``GET /admin/config``) is printed (``pytest -s``);
the watcher polls twice a second and waits 0.3 s for the file to settle."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from _cli import assert_accounts_balance, free_port
from _running_agent import RunningAgent, http, wait_http

CONFIG = """
[source]
use = "synthetic"
config = {{ rate_per_s = 2000, batch_size = 100 }}

[[stages]]
use = "sampler"
config = {{ seed = 1, max_sample_rate = {max_rate} }}

[sink]
use = "null"
"""


def kubelet_update(root: Path, text: str, version: int) -> None:
    """What the kubelet does with a ConfigMap volume: a new timestamped directory, then
    one atomic rename of the ``..data`` symlink; ``bpfpipe.toml -> ..data/bpfpipe.toml``."""
    data = root / f"..2026_12_02_00_00_{version:02d}.000000001"
    data.mkdir()
    (data / "bpfpipe.toml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")
    link = root / "bpfpipe.toml"
    if not link.is_symlink():
        link.symlink_to("..data/bpfpipe.toml")


def _wait_version(port: int, version: int, timeout_s: float = 15) -> float:
    start = time.monotonic()
    while True:
        status, body = http("GET", port, "/admin/config")
        if status == 200 and body["version"] == version:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, body
        time.sleep(0.02)


def test_kubelet_style_swap_reloads_without_a_signal(tmp_path: Path) -> None:
    mount = tmp_path / "config"
    mount.mkdir()
    kubelet_update(mount, CONFIG.format(max_rate=1000), 1)
    admin, metrics = free_port(), free_port()
    agent = RunningAgent(
        "--config", str(mount / "bpfpipe.toml"), env={"ADMIN_PORT": str(admin), "METRICS_PORT": str(metrics)}
    )
    try:
        assert wait_http(admin, "/admin/config")["version"] == 1
        agent.wait_for('msg="pipeline started"')

        kubelet_update(mount, CONFIG.format(max_rate=64), 2)
        seconds = _wait_version(admin, 2)
        print(f"\nConfigMap swap -> version 2 applied: {seconds * 1000:.0f} ms")
        _, body = http("GET", admin, "/admin/config")
        assert body["config"]["stages"][0]["config"]["max_sample_rate"] == 64
        assert agent.wait_for(r'msg="config file changed \(1\): reloading"')

        kubelet_update(mount, CONFIG.format(max_rate='"many"'), 3)  # a broken edit
        agent.wait_for(r'msg="config reload failed')
        assert http("GET", admin, "/admin/config")[1]["version"] == 2
        _, text = http("GET", metrics, "/metrics")
        assert re.search(r"^bpfpipe_config_reload_failures_total 1(\.0)?$", text, re.M), text
    finally:
        code = agent.stop()
    assert code == 0, agent.stderr
    assert_accounts_balance(agent.stderr)
    assert len(agent.matching(r'msg="config file changed \(\d\): reloading"')) == 2, agent.stderr
