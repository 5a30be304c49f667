"""The CLI as a user runs it: output, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _cli import BPFPIPE, CLEAN_ENV, assert_one_line_error, bpfpipe
from _privilege import unprivileged


def test_version() -> None:
    proc = bpfpipe("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("bpfpipe 0.")


def test_synthetic_run_prints_json_lines() -> None:
    proc = bpfpipe("run", "--source", "synthetic", "--duration", "0.5")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(events) > 10
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert {"pid", "ts_ns", "weight"} <= set(events[0])
    assert "pipeline finished" in proc.stderr and "pending=0" in proc.stderr


def test_sigint_stops_gracefully(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    config = tmp_path / "c.toml"
    config.write_text(f'[source]\nuse = "synthetic"\n[sink]\nuse = "jsonl"\n[sink.config]\npath = "{out}"\n')
    proc = subprocess.Popen(
        [*BPFPIPE, "run", "--config", str(config)], stderr=subprocess.PIPE, text=True, env=CLEAN_ENV
    )
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert 'msg="shutdown: not ready" step="not ready"' in stderr and 'reason="signal SIGINT"' in stderr
    assert "pending=0" in stderr
    lines = out.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(len(lines)))


def test_check_prints_effective_config_with_env_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("metrics_port = 9100\nlog_level = 'warning'\n")
    proc = bpfpipe("check", str(config), "--log-level", "error", env={"METRICS_PORT": "9200"})
    assert proc.returncode == 0, proc.stderr
    assert "metrics_port = 9200" in proc.stdout
    assert 'log_level = "error"' in proc.stdout


def test_check_uses_bpfpipe_config_env(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("bpf_map_size = 4096\n")
    proc = bpfpipe("check", env={"BPFPIPE_CONFIG": str(config)})
    assert proc.returncode == 0
    assert "bpf_map_size = 4096" in proc.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('metrics_port = "abc"\n', 'metrics_port: expected int, got "abc"'),
        (
            "[feature_flags]\nenhanced_metric = true\n",
            "feature_flags.enhanced_metric: unknown key (did you mean 'enhanced_metrics'?)",
        ),
        (
            "[[stages]]\nuse = 'nosuch.module:Stage'\n",
            "stage 'nosuch.module:Stage': cannot import 'nosuch.module': No module named 'nosuch'",
        ),
    ],
)
def test_check_broken_config_is_one_line_exit_2(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    assert_one_line_error(bpfpipe("check", str(config)), 2, message)
    assert_one_line_error(bpfpipe("run", "--config", str(config), env={"METRICS_PORT": None}), 2, message)


def test_bad_env_is_one_line_exit_2() -> None:
    assert_one_line_error(
        bpfpipe("check", env={"METRICS_PORT": "abc"}),
        2,
        'METRICS_PORT (environment): expected int, got "abc"',
    )


def test_usage_error_exit_2() -> None:
    proc = bpfpipe("run", "--duration", "soon")
    assert proc.returncode == 2
    assert "invalid float value" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('metrics_port = "abc"\n')
    proc = bpfpipe("--debug", "check", str(config))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_not_root_says_what_is_missing_exit_3(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    proc = subprocess.run(
        [*unprivileged(), *BPFPIPE, "run", "--source", "exec", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**CLEAN_ENV, "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    prefix = "bpfpipe: error: stage 'exec' failed to start: BPF unavailable: not running as root"
    assert last.startswith(prefix)
    assert "CAP_BPF" in last and "--source synthetic" in last
    assert "Traceback" not in proc.stderr


def test_closed_stdout_stops_gracefully() -> None:
    """`bpfpipe run | head -1`: the reader goes away; we stop cleanly, say so, exit 1."""
    proc = subprocess.Popen(
        [*BPFPIPE, "run", "--source", "synthetic"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLEAN_ENV,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=30)
    assert json.loads(first)["seq"] == 0
    assert proc.returncode == 1, stderr
    assert stderr.splitlines()[-1].startswith("bpfpipe: error: output of stage 'jsonl' closed: ")
    assert "output closed" in stderr and "pending=0" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
