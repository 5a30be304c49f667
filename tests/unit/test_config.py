"""Config: seed defaults, precedence (defaults < file < env < CLI) and every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    MAX_CONFIG_BYTES,
    Config,
    FeatureFlags,
    decode_config,
    dump_config,
    env_overrides,
    load_config,
)
from pipeline.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bpfpipe.toml"
    path.write_text(text)
    return path


def test_seed_defaults_exactly() -> None:
    config = Config()
    assert config.log_level == "info"
    assert config.metrics_port == 9090
    assert config.health_check_port == 8080
    assert config.bpf_map_size == 65536
    assert config.ring_buffer_size == 262144
    assert config.enable_debug is False
    assert config.feature_flags == FeatureFlags(new_parser=False, enhanced_metrics=False)


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "warning"\nmetrics_port = 9100\n[feature_flags]\nnew_parser = true\n')
    config = load_config(path)
    assert (config.log_level, config.metrics_port) == ("warning", 9100)
    assert config.feature_flags.new_parser is True
    assert config.feature_flags.enhanced_metrics is False  # untouched keys keep defaults
    assert config.health_check_port == 8080


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "warning"\nmetrics_port = 9100\nenable_debug = false\n')
    env = {"BPF_LOG_LEVEL": "ERROR", "METRICS_PORT": "9200", "BPF_DEBUG": "1"}
    config = load_config(path, environ=env)
    assert (config.log_level, config.metrics_port, config.enable_debug) == ("error", 9200, True)
    config = load_config(path, environ=env, overrides={"metrics_port": 9300})
    assert (config.log_level, config.metrics_port) == ("error", 9300)


def test_env_without_file_and_unrelated_env_ignored() -> None:
    config = load_config(None, environ={"METRICS_PORT": " 9500 ", "HOME": "/root"})
    assert config.metrics_port == 9500
    assert env_overrides({}) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('metrics_port = "abc"', 'metrics_port: expected int, got "abc"'),
        ("metrics_port = 70000", "metrics_port: expected int <= 65535, got 70000"),
        (
            'log_level = "verbose"',
            'log_level: expected one of "debug", "info", "warning", "error", "critical", got "verbose"',
        ),
        ("metrics_prot = 1", "metrics_prot: unknown key (did you mean 'metrics_port'?)"),
        (
            "[feature_flags]\nnew_parsr = true",
            "feature_flags.new_parsr: unknown key (did you mean 'new_parser'?)",
        ),
        ("zzz = 1", "zzz: unknown key"),
        ('[[stages]]\nname = "x"', "stages[0].use: required key is missing"),
        ("[[stages]]\nuse = 'noop'\ncapacity = 0", "stages[0].capacity: expected int >= 1, got 0"),
        ("[channels]\ncapacity = 'big'", 'channels.capacity: expected int, got "big"'),
        ("enable_debug = 1", "enable_debug: expected bool, got 1"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value) == message
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "metrics_port = = 3")
    with pytest.raises(ConfigError, match=r"bpfpipe\.toml: invalid TOML: .*line 1"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file: No such file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"METRICS_PORT": "abc"}, 'METRICS_PORT (environment): expected int, got "abc"'),
        (
            {"BPF_DEBUG": "maybe"},
            "BPF_DEBUG (environment): expected a boolean (1/0, true/false), got 'maybe'",
        ),
        (
            {"BPF_LOG_LEVEL": "loud"},
            'log_level: expected one of "debug", "info", "warning", "error", "critical", got "loud"',
        ),
        ({"METRICS_PORT": "-1"}, "metrics_port: expected int >= 0, got -1"),
    ],
)
def test_bad_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=env)
    assert str(info.value) == message


def test_dump_round_trips_a_full_config() -> None:
    raw = {
        "log_level": "debug",
        "source": {"use": "synthetic", "config": {"rate_per_s": 5.0, "seed": 3}},
        "stages": [{"use": "noop", "name": "a", "capacity": 2}, {"use": "noop", "name": "b"}],
        "sink": {"use": "null"},
        "limits": {"max_inflight_events": 10},
    }
    config = decode_config(raw)
    assert decode_config(__import__("tomllib").loads(dump_config(config))) == config


@pytest.mark.parametrize(
    ("env", "overrides"),
    [
        ({"BPF_LOG_LEVEL": "loud"}, {"log_level": "info"}),
        ({"METRICS_PORT": "abc"}, {"metrics_port": 9100}),
        ({"BPF_DEBUG": "maybe"}, {"enable_debug": True}),
    ],
)
def test_a_flag_wins_over_a_bad_environment_value(env: dict[str, str], overrides: dict[str, object]) -> None:
    config = load_config(None, environ=env, overrides=overrides)
    key, value = next(iter(overrides.items()))
    assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"log_level = '\xc3\x28'\n", "config file is not valid UTF-8 (byte 13); save it as UTF-8"),
        (b"\xfe\xff\x00l", "config file is UTF-16; save it as UTF-8"),
        (b"x = " + b"[" * 33 + b"]" * 33, "x[0]" + "[0]" * 30 + ": nested more than 32 levels deep"),
        (b"#" * (MAX_CONFIG_BYTES + 1), "config file is larger than 1 MiB, the limit; is it the right file?"),
    ],
    ids=["invalid-utf8", "utf16-bom", "too-deep", "too-big"],
)
def test_hostile_files_are_one_line_config_errors(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bpfpipe.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) in (f"{path}: {problem}", problem)
    assert "\n" not in str(info.value)


def test_utf8_bom_and_the_size_limit_itself_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "bpfpipe.toml"
    text = b"metrics_port = 9100\n"
    path.write_bytes(b"\xef\xbb\xbf" + text + b"#" * (MAX_CONFIG_BYTES - len(text) - 3))
    assert load_config(path).metrics_port == 9100


def test_shutdown_drain_timeout_default_and_bounds(tmp_path: Path) -> None:
    assert Config().shutdown.drain_timeout_s == 30.0
    assert load_config(write(tmp_path, "[shutdown]\ndrain_timeout_s = 0.5")).shutdown.drain_timeout_s == 0.5
    with pytest.raises(ConfigError, match=r"^shutdown\.drain_timeout_s: expected float > 0.0, got 0$"):
        load_config(write(tmp_path, "[shutdown]\ndrain_timeout_s = 0"))
