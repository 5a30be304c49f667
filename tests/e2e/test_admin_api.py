"""The admin API of a running ``bpfpipe run``, exposed beyond loopback behind a bearer
token (the test itself only ever connects to 127.0.0.1): 401 without the token or with
a wrong one, 413 past the body limit, 400 naming the key path for an invalid document,
restart-required keys reported and not applied, and never on the public ports."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _cli import assert_accounts_balance, free_port
from _running_agent import RunningAgent, http, wait_http

from pipeline.admin import MAX_BODY_BYTES

TOKEN = "s3cret-token-for-the-test"


class Agent:
    def __init__(self, running: RunningAgent, admin: int, metrics: int, health: int) -> None:
        self.running, self.admin, self.metrics, self.health = running, admin, metrics, health

    def get(self, token: str | None = TOKEN) -> tuple[int, Any]:
        return http("GET", self.admin, "/admin/config", token=token)

    def post(
        self, body: Any = None, *, token: str | None = TOKEN, data: bytes | None = None
    ) -> tuple[int, Any]:
        return http("POST", self.admin, "/admin/config", body, token=token, data=data)

    def version(self) -> int:
        status, body = self.get()
        assert status == 200, body
        return int(body["version"])


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    directory = tmp_path_factory.mktemp("admin")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    config = directory / "bpfpipe.toml"
    config.write_text(
        'admin_bind = "0.0.0.0"\n'
        f'admin_token_file = "{token_file}"\n'
        'metrics_bind = "127.0.0.1"\n'
        'health_bind = "127.0.0.1"\n'
        "[source]\n"
        'use = "synthetic"\n'
        "config = { rate_per_s = 2000, batch_size = 100 }\n"
        "[[stages]]\n"
        'use = "sampler"\n'
        "[sink]\n"
        'use = "null"\n'
    )
    admin, metrics, health = free_port(), free_port(), free_port()
    env = {"ADMIN_PORT": str(admin), "METRICS_PORT": str(metrics), "HEALTH_CHECK_PORT": str(health)}
    running = RunningAgent("--config", str(config), env=env)
    try:
        wait_http(admin, "/admin/config", token=TOKEN)
        yield Agent(running, admin, metrics, health)
    finally:
        code = running.stop()
    assert code == 0, running.stderr
    assert_accounts_balance(running.stderr)


def test_no_token_or_a_wrong_one_is_401_and_changes_nothing(agent: Agent) -> None:
    version = agent.version()
    for token in (None, "wrong", TOKEN + "x", ""):
        status, body = agent.get(token=token)
        assert status == 401, body
        status, body = agent.post({"log_level": "debug"}, token=token)
        assert status == 401, body
        assert "token" in body["error"]
    assert agent.version() == version
    assert agent.get()[1]["config"]["log_level"] == "info"


def test_with_the_token_a_change_applies_and_the_version_goes_up(agent: Agent) -> None:
    version = agent.version()
    status, result = agent.post({"stages": [{"use": "sampler", "config": {"min_sample_rate": 2}}]})
    assert status == 200, result
    assert result["ok"] is True and result["version"] == version + 1
    assert result["applied"] == ["stages[0].config.min_sample_rate"]
    assert result["restart_required"] == [] and result["graph_switched"] is False
    status, body = agent.get()
    assert body["version"] == version + 1
    assert body["config"]["stages"][0]["config"] == {"min_sample_rate": 2}
    agent.running.wait_for(r'msg="sampling rate 1 -> 2 \(new bounds\)"')


def test_an_oversized_body_is_413(agent: Agent) -> None:
    version = agent.version()
    padding = "x" * (MAX_BODY_BYTES + 1)
    status, body = agent.post(data=('{"log_level": "debug", "pad": "' + padding + '"}').encode())
    assert status == 413, body
    assert agent.version() == version


def test_an_invalid_document_is_400_naming_the_key_path(agent: Agent) -> None:
    version = agent.version()
    cases = [
        ({"limits": {"max_inflight_events": "lots"}}, r"^limits\.max_inflight_events: expected int"),
        ({"feature_flags": {"new_parsr": True}}, r"^feature_flags\.new_parsr: unknown key \(did you mean"),
        (
            {"stages": [{"use": "sampler", "config": {"min_sample_rate": 0}}]},
            r"stages\[0\]\.config\.min_sample_rate",
        ),
        ({"stages": [{"use": "no.such.module:Stage"}]}, r"cannot import"),
    ]
    for document, pattern in cases:
        status, body = agent.post(document)
        assert status == 400, body
        assert re.search(pattern, body["error"]), body
    for data in (b"{not json", b"[1, 2]"):
        status, body = agent.post(data=data)
        assert status == 400, body
    assert agent.version() == version
    status, text = http("GET", agent.metrics, "/metrics")
    assert re.search(r"^bpfpipe_config_reload_failures_total [1-9]", text, re.M), text


def test_restart_required_keys_are_reported_and_not_applied(agent: Agent) -> None:
    version = agent.version()
    status, result = agent.post({"metrics_port": free_port(), "ring_buffer_size": 8192, "log_level": "debug"})
    assert status == 200, result
    assert result["applied"] == ["log_level"]
    assert result["restart_required"] == ["metrics_port", "ring_buffer_size"]
    assert result["version"] == version + 1
    config = agent.get()[1]["config"]
    assert (config["metrics_port"], config["ring_buffer_size"]) == (agent.metrics, 262144)
    assert config["log_level"] == "debug"
    [line] = agent.running.wait_for(r'msg="config keys need a restart')
    assert "keys=metrics_port,ring_buffer_size" in line
    assert http("GET", agent.metrics, "/metrics")[0] == 200  # still where it was


def test_the_admin_routes_are_not_on_the_public_ports(agent: Agent) -> None:
    for port in (agent.metrics, agent.health):
        assert http("GET", port, "/admin/config")[0] == 404
        assert http("POST", port, "/admin/config", {"log_level": "debug"})[0] == 404


def test_the_token_file_is_required_beyond_loopback(tmp_path: Path) -> None:
    from _cli import bpfpipe

    proc = bpfpipe("check", env={"BPFPIPE_CONFIG": _write(tmp_path, 'admin_bind = "0.0.0.0"\n')})
    assert proc.returncode == 2
    assert proc.stderr.startswith("bpfpipe: error: admin_bind: 0.0.0.0 exposes the admin API"), proc.stderr


def _write(directory: Path, text: str) -> str:
    path = directory / "bpfpipe.toml"
    path.write_text(text)
    return str(path)
