"""Fleet policy's pure core: keys, parsing with key paths, merging, whole validation, the
candidate config (policy over the agent's own values), the status document."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from pipeline.config import FleetConfig, decode_config
from pipeline.errors import ConfigError
from pipeline.fleet import (
    POLICY_LEAVES,
    NodeStatus,
    capture_base,
    decode_status,
    encode_status,
    evaluate,
    merge_policies,
    node_key,
    node_name,
    parse_policy,
    policy_candidate,
    policy_document,
    refresh_base,
    status_key,
    validate_policy,
)
from pipeline.reload import plan_reload

FULL = {
    "source": {
        "config": {"blocked_ips": ["10.0.0.5", "2001:db8::/32"], "rate_limit": {"pps": 100, "burst": 5}}
    },
    "sampler": {"min_sample_rate": 2, "max_sample_rate": 500},
    "limits": {"max_events_per_sec": 2000},
    "feature_flags": {"enhanced_metrics": True},
}


def doc_of(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(decode_config(raw))
    return out


def firewall_doc(blocked: list[str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"options": {"interface": "lo"}}
    if blocked is not None:
        config["blocked_ips"] = blocked
    return doc_of({"source": {"use": "xdp_firewall", "config": config}, "sink": {"use": "null"}})


def sampler_doc(**sampler: Any) -> dict[str, Any]:
    return doc_of(
        {
            "source": {"use": "synthetic"},
            "stages": [{"use": "sampler", "config": sampler}, {"use": "noop"}],
            "sink": {"use": "null"},
        }
    )


def test_keys_and_node_names() -> None:
    assert (node_key("a"), status_key("a")) == ("node.a", "status.a")
    assert node_name(FleetConfig(node="edge-1")) == "edge-1"
    assert node_name(FleetConfig(), hostname="web01.example.com") == "web01"
    assert node_name(FleetConfig(), hostname="wéird host") == "w_ird_host"


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        (
            {"servers": ["http://h:4222"]},
            'fleet.servers[0]: expected a NATS URL such as nats://host:4222, got "http://h:4222"',
        ),
        ({"servers": ["nats://h:4222", ""]}, "fleet.servers[1]: expected a NATS URL"),
        ({"node": "a.b"}, 'fleet.node: expected 1-64 letters, digits, - and _ (no dots), got "a.b"'),
        ({"bucket": "x>"}, 'fleet.bucket: expected letters, digits, - and _, got "x>"'),
        ({"connect_timeout_s": 0}, "fleet.connect_timeout_s: expected float > 0.0, got 0"),
        ({"server": []}, "fleet.server: unknown key (did you mean 'servers'?)"),
    ],
)
def test_fleet_config_errors_name_the_key(fleet: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_config({"fleet": fleet})
    assert str(info.value).startswith(message), str(info.value)


def test_fleet_is_restart_required_on_reload() -> None:
    from pipeline.reload import RESTART, classify

    assert classify("fleet.servers", None) == RESTART


def test_a_full_policy_parses_to_its_leaves_and_back() -> None:
    policy = parse_policy(json.dumps(FULL).encode(), "global")
    assert set(policy) <= set(POLICY_LEAVES)
    assert policy["source.config.rate_limit"] == {"pps": 100, "burst": 5}
    assert policy_document(policy) == FULL
    assert parse_policy(b"{}", "global") == {}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"[1]", "global: expected a JSON object, got list"),
        (b"{", "global: not JSON"),
        (
            {"limits": {"max_event_per_sec": 5}},
            "global: limits.max_event_per_sec: unknown key (did you mean 'max_events_per_sec'?)",
        ),
        (
            {"limits": {"max_events_per_sec": -1}},
            "global: limits.max_events_per_sec: expected int >= 0, got -1",
        ),
        ({"ports": 1}, "global: ports: unknown key"),
        ({"source": {"use": "exec"}}, "global: source.use: unknown key"),
        ({"source": {"config": {"options": {}}}}, "global: source.config.options: unknown key"),
        ({"sampler": {"min_sample_rate": 0}}, "global: sampler.min_sample_rate: expected int >= 1, got 0"),
        ({"sampler": {"seed": 1}}, "global: sampler.seed: unknown key"),
        (
            {"feature_flags": {"new_parser": "yes"}},
            'global: feature_flags.new_parser: expected bool, got "yes"',
        ),
        (
            {"source": {"config": {"rate_limit": {"pps": -1}}}},
            "global: source.config.rate_limit.pps: expected int >= 0, got -1",
        ),
    ],
)
def test_anything_outside_the_policy_subset_is_rejected_with_its_path(document: Any, message: str) -> None:
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(ConfigError) as info:
        parse_policy(data, "global")
    assert str(info.value).startswith(message), str(info.value)


def test_the_override_wins_leaf_by_leaf_and_the_merge_is_validated_whole() -> None:
    base = parse_policy(json.dumps(FULL).encode(), "global")
    override = parse_policy(
        b'{"limits": {"max_events_per_sec": 10}, "sampler": {"max_sample_rate": 9}}', "node.a"
    )
    merged = merge_policies(base, override)
    assert merged["limits.max_events_per_sec"] == 10
    assert merged["feature_flags.enhanced_metrics"] is True
    validate_policy(merged)
    bad = merge_policies(base, {"sampler.max_sample_rate": 1})  # below the global minimum 2
    with pytest.raises(
        ConfigError, match=r"^sampler: need 1 <= min_sample_rate <= max_sample_rate, got 2, 1"
    ):
        validate_policy(bad)
    with pytest.raises(ConfigError, match=r"^source\.config\.blocked_ips\[1\]: not an IP address or prefix"):
        validate_policy({"source.config.blocked_ips": ["10.0.0.1", "10.0.0.300"]})


def test_evaluate_reports_revisions_and_the_first_error() -> None:
    layers = {"global": (3, json.dumps(FULL).encode()), "node.a": (7, b'{"limits": {"max_memory_mb": 64}}')}
    ok = evaluate("a", layers)
    assert ok.revisions == {"global": 3, "node.a": 7} and not ok.error
    assert ok.policy is not None and ok.policy["limits.max_memory_mb"] == 64
    assert evaluate("b", layers).revisions == {"global": 3, "node.b": 0}
    deleted = evaluate("a", {"global": (4, None)})
    assert deleted.policy == {} and deleted.revisions == {"global": 4, "node.a": 0}
    bad = evaluate("a", {**layers, "node.a": (8, b'{"limits": {"nope": 1}}')})
    assert bad.policy is None and bad.error.startswith("node.a: limits.nope: unknown key")


def test_the_candidate_sets_the_firewall_leaves_on_a_firewall_agent_only() -> None:
    policy = parse_policy(json.dumps(FULL).encode(), "global")
    fw = firewall_doc(["192.0.2.1"])
    partial = policy_candidate(fw, capture_base(fw), policy)
    assert partial["source"]["config"]["blocked_ips"] == ["10.0.0.5", "2001:db8::/32"]
    assert partial["source"]["config"]["rate_limit"] == {"pps": 100, "burst": 5}
    assert partial["limits"]["max_events_per_sec"] == 2000 and partial["feature_flags"]["enhanced_metrics"]
    assert "stages" not in partial
    synthetic = sampler_doc()
    partial = policy_candidate(synthetic, capture_base(synthetic), policy)
    assert "source" not in partial
    assert partial["stages"][0]["config"] == {"min_sample_rate": 2, "max_sample_rate": 500}
    assert partial["stages"][1] == synthetic["stages"][1]


def test_the_candidate_is_all_live_changes_for_the_reloader() -> None:
    policy = parse_policy(json.dumps(FULL).encode(), "global")
    fw = firewall_doc(["192.0.2.1"])
    candidate = {**fw, **policy_candidate(fw, capture_base(fw), policy)}
    plan = plan_reload(fw, candidate, frozenset({"blocked_ips", "rate_limit"}))
    assert not plan.restart_required and plan.applied


def test_a_leaf_the_policy_drops_goes_back_to_the_agents_own_value() -> None:
    start = sampler_doc(max_sample_rate=50)
    base = capture_base(start)
    first = parse_policy(b'{"sampler": {"min_sample_rate": 5, "max_sample_rate": 80}}', "global")
    running = {**start, **policy_candidate(start, base, first)}
    assert running["stages"][0]["config"] == {"min_sample_rate": 5, "max_sample_rate": 80}
    base = refresh_base(base, running, first)
    partial = policy_candidate(running, base, {})  # the policy emptied
    # max back to the config's own 50; min (unset in the config) to its default, 1
    assert partial["stages"][0]["config"] == {"min_sample_rate": 1, "max_sample_rate": 50}
    assert policy_candidate(start, capture_base(start), {}) == {}  # nothing to change: no reload


def test_a_reload_updates_the_base_only_where_the_policy_is_silent() -> None:
    start = firewall_doc(["192.0.2.1"])
    applied = parse_policy(b'{"source": {"config": {"blocked_ips": ["10.0.0.5"]}}}', "global")
    base = capture_base(start)
    # A SIGHUP: the file now says another blocked list and another rate.
    reloaded = firewall_doc(["192.0.2.99"])
    reloaded["limits"]["max_memory_mb"] = 99
    base = refresh_base(base, reloaded, applied)
    assert base[("source", "config", "blocked_ips")] == ["192.0.2.1"]  # the policy's leaf: unchanged
    assert base[("limits", "max_memory_mb")] == 99  # the file is the truth where the policy is silent
    partial = policy_candidate(reloaded, base, applied)
    assert partial == {
        "source": {
            **reloaded["source"],
            "config": {**reloaded["source"]["config"], "blocked_ips": ["10.0.0.5"]},
        }
    }


def test_status_document_round_trips() -> None:
    status = NodeStatus(
        node="a",
        ok=False,
        revisions={"global": 2, "node.a": 0},
        config_version=3,
        applied_unix=1.5,
        updated_unix=2.5,
        error="global: limits.x: unknown key",
        rejected_revisions={"global": 3, "node.a": 0},
    )
    assert decode_status(encode_status(status)) == status
    assert json.loads(encode_status(status))["rejected_revisions"] == {"global": 3, "node.a": 0}


# -- the shell's apply step against a running pipeline (no NATS: the layers set directly) ------

RUNNING = {
    "source": {"use": "synthetic", "config": {"rate_per_s": 20_000, "batch_size": 200}},
    "stages": [{"use": "sampler", "config": {"seed": 1, "max_sample_rate": 1000}}],
    "sink": {"use": "null"},
    "metrics_port": 0,
    "health_check_port": 0,
    "admin_port": 0,
}


async def test_the_agent_applies_rejects_and_puts_the_policy_back_after_a_reload() -> None:
    import trio

    from pipeline._build import build_specs
    from pipeline._graph import Pipeline
    from pipeline.fleet import FleetAgent
    from pipeline.reload import Reloader

    config = decode_config(RUNNING)
    specs, capacities = build_specs(config)
    pipe = Pipeline(specs, capacities, settings=config)
    reloader = Reloader(config)
    reloader.bind(pipe)
    agent = FleetAgent(FleetConfig(servers=["nats://127.0.0.1:1"], node="a"), reloader, clock=lambda: 100.0)

    def sampler() -> dict[str, Any]:
        return dict(reloader.effective()["config"]["stages"][0]["config"])

    async with trio.open_nursery() as nursery:
        await nursery.start(pipe.run)
        agent.layers = {
            "global": (5, b'{"sampler": {"max_sample_rate": 300}, "limits": {"max_memory_mb": 64}}')
        }
        status = await agent._apply()
        assert status.ok and status.revisions == {"global": 5, "node.a": 0} and status.applied_unix == 100.0
        assert sampler()["max_sample_rate"] == 300 and status.config_version == 2

        # The merge is wrong (the override's min over the global max): refused before the Reloader.
        agent.layers["node.a"] = (6, b'{"sampler": {"min_sample_rate": 500}}')
        status = await agent._apply()
        assert not status.ok and status.error.startswith(
            "sampler: need 1 <= min_sample_rate <= max_sample_rate"
        )
        assert status.revisions == {"global": 5, "node.a": 0}
        assert status.rejected_revisions == {"global": 5, "node.a": 6}
        assert sampler()["max_sample_rate"] == 300 and reloader.statistics().version == 2
        # Valid as a policy, wrong on this node (min over its own max, 1000): the Reloader refuses it.
        agent.layers = {"global": (7, b'{"sampler": {"min_sample_rate": 2000}}')}
        status = await agent._apply()
        assert not status.ok and status.error.startswith("stage 'sampler': stages[0].config: need 1 <=")
        assert status.revisions == {"global": 5, "node.a": 0}
        assert sampler()["max_sample_rate"] == 300 and reloader.statistics().version == 2
        agent.layers = {
            "global": (5, b'{"sampler": {"max_sample_rate": 300}, "limits": {"max_memory_mb": 64}}')
        }

        # An admin reload puts the file's value back: the agent is told, and re-applies.
        await agent._apply()
        assert not agent._reapply
        await reloader.apply_document(
            {"stages": [{"use": "sampler", "config": {"seed": 1, "max_sample_rate": 9}}]}
        )
        assert agent._reapply and sampler()["max_sample_rate"] == 9
        await agent._apply()
        assert sampler()["max_sample_rate"] == 300
        # The policy dropping the leaf: back to the config's own value.
        agent.layers["global"] = (8, b"{}")
        status = await agent._apply()
        assert status.ok and sampler()["max_sample_rate"] == 1000
        assert reloader.effective()["config"]["limits"]["max_memory_mb"] == 256
        pipe.stop()
