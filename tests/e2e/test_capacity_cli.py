"""``bpfpipe capacity`` as a user runs it: TOML the agent accepts, one-line errors."""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

from _cli import assert_one_line_error, bpfpipe, free_port

from pipeline.capacity import Workload, load_calibration, recommend
from pipeline.config import decode_config, read_toml


def test_recommendation_matches_the_model_and_loads_as_config(tmp_path: Path) -> None:
    proc = bpfpipe("capacity", "--rate", "10000", "--event-bytes", "64", "--burst-s", "2", "--cpus", "0.5")
    assert proc.returncode == 0, proc.stderr
    expected = recommend(Workload(rate_per_s=10_000, event_bytes=64, burst_s=2, cpus=0.5), load_calibration())
    assert "calibration: pipeline/calibration.json (shipped), measured 20" in proc.stdout
    path = tmp_path / "c.toml"
    path.write_text(proc.stdout)
    config = decode_config(read_toml(path))
    assert config.ring_buffer_size == expected.ring_buffer_bytes
    assert config.channels.capacity == expected.channel_capacity
    assert config.limits.max_inflight_events == expected.max_inflight_events == 20_000
    assert config.limits.max_memory_mb == expected.max_memory_mb


def test_missing_workload_is_one_line_exit_2() -> None:
    assert_one_line_error(
        bpfpipe("capacity"), 2, "capacity: give --rate and --event-bytes, or --from-agent URL"
    )
    assert_one_line_error(
        bpfpipe("capacity", "--rate", "-5", "--event-bytes", "64"), 2, "--rate: expected a number > 0, got -5"
    )


def test_no_agent_is_one_line_exit_4() -> None:
    port = free_port()
    proc = bpfpipe("capacity", "--from-agent", f"http://127.0.0.1:{port}")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith(f"bpfpipe: error: no agent answering at http://127.0.0.1:{port}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_bad_calibration_file_is_one_line_exit_2(tmp_path: Path) -> None:
    args = ("capacity", "--rate", "1000", "--event-bytes", "64", "--calibration")
    missing = tmp_path / "missing.json"
    assert_one_line_error(
        bpfpipe(*args, str(missing)), 2, f"--calibration: cannot read {missing}: No such file or directory"
    )
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"per_event_us": 0.1}')
    assert_one_line_error_starting(
        bpfpipe(*args, str(wrong)), 2, f"--calibration: {wrong} is not a calibration file (KeyError: "
    )


def test_a_malformed_url_or_a_server_that_is_not_an_agent_is_one_line_exit_4() -> None:
    bad = bpfpipe("capacity", "--from-agent", "http://[::1")
    assert_one_line_error_starting(bad, 4, "no agent answering at http://[::1 (Invalid IPv6 URL)")

    class NotPrometheus(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>\n"
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotPrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = bpfpipe("capacity", "--from-agent", url, "--sample-s", "1")
        assert_one_line_error_starting(proc, 4, f"{url}/metrics is not Prometheus text (")
    finally:
        server.shutdown()
        server.server_close()


def assert_one_line_error_starting(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"bpfpipe: error: {text}"), proc.stderr
