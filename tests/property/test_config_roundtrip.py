"""Any valid config survives dump → load unchanged."""

from __future__ import annotations

import tomllib

from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import (
    ChannelsConfig,
    Config,
    FeatureFlags,
    LimitsConfig,
    NodeConfig,
    decode_config,
    dump_config,
)

names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
stage_configs = st.dictionaries(
    names, st.one_of(toml_scalars, st.lists(st.integers(), max_size=3)), max_size=4
)
nodes = st.builds(
    NodeConfig,
    use=st.one_of(names, st.just("pkg.mod:Class")),
    name=st.one_of(st.just(""), names),
    capacity=st.one_of(st.none(), st.integers(1, 1 << 20)),
    config=stage_configs,
)
configs = st.builds(
    Config,
    log_level=st.sampled_from(["debug", "info", "warning", "error", "critical"]),
    # Distinct ports (0 is "off" and may repeat), none the admin API's default 8081: two
    # servers on one port is a config error, not a config.
    metrics_port=st.integers(0, 8000),
    health_check_port=st.one_of(st.just(0), st.integers(8100, 65535)),
    bpf_map_size=st.integers(1, 1 << 30),
    ring_buffer_size=st.integers(1, 1 << 30),
    enable_debug=st.booleans(),
    feature_flags=st.builds(FeatureFlags, new_parser=st.booleans(), enhanced_metrics=st.booleans()),
    source=nodes,
    stages=st.lists(nodes, max_size=4),
    sink=nodes,
    channels=st.builds(ChannelsConfig, capacity=st.integers(1, 4096)),
    limits=st.builds(
        LimitsConfig, max_inflight_events=st.integers(0, 1 << 40), max_inflight_bytes=st.integers(0, 1 << 40)
    ),
)


@given(configs)
def test_dump_then_load_is_identity(config: Config) -> None:
    text = dump_config(config)
    assert decode_config(tomllib.loads(text)) == config
