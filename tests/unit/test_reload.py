"""Live reload: the pure core (diff, classification, plans), the stages' ``reconfigure``,
the decoder's strict parser, and the Reloader against a running synthetic pipeline."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import numpy as np
import pytest
import trio

from bpf.ringbuf import SimulatedRing
from pipeline import Batch, NodeSpec, Pipeline, Stage
from pipeline._build import build_specs
from pipeline.config import Config, decode_config
from pipeline.errors import ConfigError
from pipeline.reload import (
    CHAIN,
    LIVE,
    RESTART,
    SOURCE_POLICY_FIELDS,
    Reloader,
    changed_paths,
    classify,
    live_fields,
    plan_chain,
    plan_reload,
)
from pipeline.testing import make_batch, run_stages
from stages.breaker import CircuitBreakerConfig, CircuitBreakerStage
from stages.decoder import Decoder, DecoderConfig, bad_strings
from stages.noop import NoopStage
from stages.raw_records import EventSchema, raw_batch
from stages.sampler import AdaptiveSampler, AdaptiveSamplerConfig

# -- changed_paths ---------------------------------------------------------------------------


def test_changed_paths_names_leaves_and_whole_lists_of_another_length() -> None:
    old = {"a": 1, "t": {"x": 1, "y": {"z": "s"}}, "l": [{"k": 1}, {"k": 2}], "m": [1]}
    new = {"a": 1, "t": {"x": 2, "y": {"z": "s"}, "w": 0}, "l": [{"k": 1}, {"k": 3}], "m": [1, 2]}
    assert changed_paths(old, new) == ["t.x", "t.w", "l[1].k", "m"]
    assert changed_paths(old, old) == []
    assert changed_paths({"a": 1}, {}) == ["a"]
    assert changed_paths({"a": 1}, {"a": 1.0}) == ["a"]  # another type is a change


# -- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("log_level", LIVE),
        ("feature_flags.new_parser", LIVE),
        ("limits.max_inflight_events", LIVE),
        ("health.heartbeat_interval_s", LIVE),
        ("stages", CHAIN),
        ("stages[2].config.min_sample_rate", CHAIN),
        ("sink.config.path", CHAIN),
        ("channels.capacity", CHAIN),
        ("metrics_port", RESTART),
        ("admin_bind", RESTART),
        ("admin_token_file", RESTART),
        ("ring_buffer_size", RESTART),
        ("bpf_map_size", RESTART),
        ("source.use", RESTART),
        ("source.name", RESTART),
        ("source.config.options.interface", RESTART),
        ("source.config.program", RESTART),
        ("source.config.blocked_ips", LIVE),
        ("source.config.blocked_ips[3]", LIVE),
        ("source.config.rate_limit.pps", LIVE),
        ("a_key_nobody_classified", RESTART),
    ],
)
def test_classify(path: str, kind: str) -> None:
    assert classify(path, SOURCE_POLICY_FIELDS) == kind


def test_a_source_without_reconfigure_has_nothing_live() -> None:
    assert classify("source.config.blocked_ips", frozenset()) == RESTART


def doc(**tables: Any) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(decode_config(tables))
    return out


def test_plan_keeps_running_values_of_restart_keys_and_applies_the_rest() -> None:
    running = doc(metrics_port=9100, source={"use": "synthetic", "config": {"rate_per_s": 10.0}})
    candidate = doc(
        metrics_port=9200,
        log_level="debug",
        source={"use": "synthetic", "config": {"rate_per_s": 20.0}},
        stages=[{"use": "noop"}],
    )
    plan = plan_reload(running, candidate, frozenset())
    assert plan.applied == ["log_level", "stages"]
    assert plan.restart_required == ["metrics_port", "source.config.rate_per_s"]
    assert plan.effective["metrics_port"] == 9100
    assert plan.effective["source"] == running["source"]
    assert plan.effective["log_level"] == "debug"
    assert decode_config(plan.effective).stages[0].use == "noop"


def test_plan_takes_only_a_sources_live_fields() -> None:
    source = {
        "use": "xdp_firewall",
        "config": {"options": {"interface": "eth0"}, "blocked_ips": ["10.0.0.1"]},
    }
    changed = {
        "use": "xdp_firewall",
        "config": {"options": {"interface": "eth1"}, "blocked_ips": ["10.0.0.2"]},
    }
    plan = plan_reload({"source": source}, {"source": changed}, SOURCE_POLICY_FIELDS)
    assert plan.applied == ["source.config.blocked_ips[0]"]
    assert plan.restart_required == ["source.config.options.interface"]
    assert plan.effective["source"]["config"] == {
        "options": {"interface": "eth0"},
        "blocked_ips": ["10.0.0.2"],
    }
    # Another source altogether: nothing of it applies.
    other = {"use": "exec", "config": {"blocked_ips": ["10.0.0.2"]}}
    plan = plan_reload({"source": source}, {"source": other}, SOURCE_POLICY_FIELDS)
    assert plan.effective["source"] == source


# -- the chain plan --------------------------------------------------------------------------


class Narrow(Stage):
    Config = CircuitBreakerConfig
    live_config_fields = frozenset({"failure_threshold"})

    def reconfigure(self, config: Any) -> None: ...

    async def run(self, rx: Any, tx: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...


def specs_of(config: Config) -> tuple[list[NodeSpec], list[int]]:
    return build_specs(config)


def plan_for(old: dict[str, Any], new: dict[str, Any], covers: dict[int, frozenset[str] | None]) -> Any:
    running, caps = build_specs(decode_config(old))
    wanted, wanted_caps = build_specs(decode_config(new))
    return plan_chain(running, caps, wanted, wanted_caps, lambda i: covers.get(i, frozenset()))


SYNTH = {"use": "synthetic"}


def test_chain_plan_reconfigures_in_place_what_reconfigure_covers() -> None:
    old = {"source": SYNTH, "stages": [{"use": "noop"}, {"use": "sampler"}], "sink": {"use": "null"}}
    new = {**old, "stages": [{"use": "noop"}, {"use": "sampler", "config": {"min_sample_rate": 4}}]}
    plan = plan_for(old, new, {2: None})
    assert (plan.switch, plan.reconfigure) == (False, (2,))
    # limits.max_events_per_sec reaches the sampler through its resolved config
    plan = plan_for(old, {**old, "limits": {"max_events_per_sec": 5}}, {2: None})
    assert (plan.switch, plan.reconfigure) == (False, (2,))
    assert plan_for(old, old, {}).reconfigure == ()


def test_chain_plan_switches_for_anything_else() -> None:
    old = {"source": SYNTH, "stages": [{"use": "sampler"}], "sink": {"use": "null"}}
    sampler4 = [{"use": "sampler", "config": {"min_sample_rate": 4}}]
    assert plan_for(old, {**old, "stages": sampler4}, {}).switch  # no reconfigure
    assert plan_for(old, {**old, "stages": [{"use": "noop"}, {"use": "sampler"}]}, {1: None}).switch
    assert plan_for(old, {**old, "stages": []}, {1: None}).switch
    assert plan_for(old, {**old, "stages": [{"use": "sampler", "name": "s2"}]}, {1: None}).switch
    assert plan_for(old, {**old, "stages": [{"use": "sampler", "capacity": 3}]}, {1: None}).switch
    assert plan_for(old, {**old, "channels": {"capacity": 4}}, {1: None}).switch
    assert plan_for(old, {**old, "sink": {"use": "jsonl"}}, {1: None}).switch
    # a narrow reconfigure that does not cover the change
    assert plan_for(old, {**old, "stages": sampler4}, {1: frozenset({"seed"})}).switch


def test_live_fields_of_nodes() -> None:
    assert live_fields(object(), source=False) == frozenset()
    assert live_fields(NoopStage(NoopStage.Config(), _ctx()), source=False) == frozenset()
    assert live_fields(AdaptiveSampler(AdaptiveSamplerConfig(), _ctx()), source=False) is None
    assert live_fields(Narrow(CircuitBreakerConfig(), _ctx()), source=False) == {"failure_threshold"}
    assert live_fields(AdaptiveSampler(AdaptiveSamplerConfig(), _ctx()), source=True) == SOURCE_POLICY_FIELDS


def _ctx() -> Any:
    from pipeline import StageContext
    from pipeline._channel import InflightBudget
    from pipeline.accounting import Ledger

    return StageContext("s", "stage", Ledger(), InflightBudget())


# -- the stages' reconfigure -------------------------------------------------------------------


async def test_sampler_reconfigure_clamps_n_into_the_new_bounds_at_once() -> None:
    sampler = AdaptiveSampler(AdaptiveSamplerConfig(max_events_per_sec=0), _ctx())
    assert sampler.sample_rate == 1
    sampler.reconfigure(AdaptiveSamplerConfig(min_sample_rate=5, max_sample_rate=10, max_events_per_sec=0))
    assert sampler.sample_rate == 5
    assert sampler.policy.params.max_sample_rate == 10
    sampler.reconfigure(AdaptiveSamplerConfig(min_sample_rate=1, max_sample_rate=3, max_events_per_sec=0))
    assert sampler.sample_rate == 3
    sampler.ctx.budget.admit_nowait(30_000, 0)  # as if the events had come down the chain
    kept = sampler.sample(make_batch(value=np.arange(30_000)), trio.current_time())
    assert kept is not None and 8_000 < len(kept) < 12_000  # 1 in 3


def test_breaker_reconfigure_takes_thresholds_and_keeps_state() -> None:
    guarded = CircuitBreakerStage.around(NoopStage)
    stage = guarded(CircuitBreakerConfig(failure_threshold=5, stage_timeout_s=1.0), _ctx())
    stage.reconfigure(CircuitBreakerConfig(failure_threshold=2, reset_timeout_s=3.0, stage_timeout_s=0))
    assert stage.breaker.failure_threshold == 2
    assert stage.breaker.reset_timeout_s == 3.0
    assert stage.guard.timeout_s == float("inf")
    assert stage.config.failure_threshold == 2
    assert CircuitBreakerStage.live_config_fields == {
        "failure_threshold",
        "reset_timeout_s",
        "stage_timeout_s",
    }


# -- the decoder's strict parser ---------------------------------------------------------------

HEADER = np.dtype([("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")])
STR = np.dtype([*HEADER.descr, ("pid", "<u4"), ("comm", "S8"), ("path", "S6")])
SCHEMA = EventSchema({1: STR}, {1: "strs"}, HEADER)


def string_events() -> np.ndarray:
    ev = np.zeros(6, dtype=STR)
    ev["type"] = 1
    ev["rate"] = 1
    ev["pid"] = np.arange(6)
    raw = ev.view(np.uint8).reshape(6, STR.itemsize)
    comm, path = slice(20, 28), slice(28, 34)
    raw[0, comm][:3] = list(b"abc")  # fine
    raw[1, comm] = list(b"abcdefgh")  # no NUL within comm
    raw[2, comm][:3] = list("é".encode() + b"x")  # valid UTF-8
    raw[3, comm][:2] = [0xC3, 0x28]  # invalid UTF-8
    raw[4, comm][:1] = [0x41]
    raw[4, comm][2:4] = [0xFF, 0xFF]  # after the NUL: not text
    raw[5, path] = list(b"/bin/x")  # no NUL within path
    return ev


def test_bad_strings_marks_unterminated_and_invalid_utf8() -> None:
    assert bad_strings(string_events()).tolist() == [False, True, False, True, False, True]
    assert bad_strings(np.zeros(0, dtype=STR)).tolist() == []


def raw_records(events: np.ndarray) -> Batch:
    """What the ring reader sends after the kernel wrote ``events``."""
    ring = SimulatedRing(1 << 14)
    try:
        assert ring.produce([e.tobytes() for e in events]) == len(events)
        read = ring.read_batch()
    finally:
        ring.close()
    return raw_batch(read, SCHEMA, source="reader", seq=0)


async def test_decoder_strict_path_drops_and_counts_malformed_strings() -> None:
    events = string_events()
    lenient = await run_stages([(Decoder, DecoderConfig(parser="lenient"))], [raw_records(events)])
    assert len(lenient.events) == 6
    strict = await run_stages([(Decoder, DecoderConfig(parser="strict"))], [raw_records(events)])
    assert strict.events["pid"].tolist() == [0, 2, 4]
    assert strict.ledger.pending == 0
    malformed = [t.count for k, t in strict.ledger.outcomes.items() if k.reason == "malformed"]
    assert malformed == [3]


def make_batch_of(events: np.ndarray) -> Batch:
    return Batch(events, source="test", seq=0, event_name="ev")


def test_decoder_parser_follows_the_feature_flag_and_reconfigures() -> None:
    flag_on = decode_config({"feature_flags": {"new_parser": True}})
    assert Decoder.resolve_config(DecoderConfig(), flag_on).parser == "strict"
    assert Decoder.resolve_config(DecoderConfig(), Config()).parser == "lenient"
    decoder = Decoder(DecoderConfig(), _ctx())
    assert decoder.config.parser == "lenient"
    batch = make_batch_of(string_events())
    decoder.ctx.budget.admit_nowait(len(batch), 0)
    decoder.reconfigure(DecoderConfig(parser="strict"))
    out = decoder._checked(batch)
    assert out is not None and out.events["pid"].tolist() == [0, 2, 4]
    assert decoder.strict_rejected_events == 3


# -- the Reloader on a running pipeline ----------------------------------------------------------

BASE = {
    "source": {"use": "synthetic", "config": {"rate_per_s": 20_000, "batch_size": 200}},
    "stages": [{"use": "sampler", "config": {"seed": 1}}],
    "sink": {"use": "null"},
    "metrics_port": 0,
    "health_check_port": 0,
    "admin_port": 0,
}


class Metrics:
    enhanced = False


async def running(nursery: trio.Nursery, raw: dict[str, Any] = BASE) -> tuple[Reloader, Pipeline]:
    config = decode_config(raw)
    specs, capacities = build_specs(config)
    pipe = Pipeline(specs, capacities, settings=config)
    seen: list[Config] = []
    reloader = Reloader(config, metrics=Metrics(), listeners=[seen.append])
    reloader.bind(pipe)
    await nursery.start(pipe.run)
    return reloader, pipe


async def test_reloader_applies_live_in_place_and_switches_the_chain() -> None:
    async with trio.open_nursery() as nursery:
        reloader, pipe = await running(nursery)
        sampler = pipe.nodes[1]
        assert isinstance(sampler, AdaptiveSampler)
        assert reloader.effective()["version"] == 1

        result = await reloader.apply_document(
            {"stages": [{"use": "sampler", "config": {"seed": 1, "min_sample_rate": 4}}]}
        )
        assert result.ok and result.version == 2 and not result.graph_switched
        assert result.applied == ["stages[0].config.min_sample_rate"]
        assert pipe.nodes[1] is sampler and sampler.sample_rate == 4

        # the diff is against what the node runs with now, not the spec it was built from
        stages = [{"use": "sampler", "config": {"seed": 1, "max_sample_rate": 2}}]
        result = await reloader.apply_document({"stages": stages})
        assert result.ok and result.version == 3 and sampler.sample_rate == 2
        assert result.applied == ["stages[0].config.min_sample_rate", "stages[0].config.max_sample_rate"]

        result = await reloader.apply_document(
            {
                "log_level": "debug",
                "limits": {"max_inflight_events": 5000},
                "feature_flags": {"enhanced_metrics": True},
            }
        )
        assert result.ok and result.version == 4
        assert logging.getLogger("bpfpipe").level == logging.DEBUG
        assert pipe.budget.max_events == 5000
        assert isinstance(reloader.metrics, Metrics) and reloader.metrics.enhanced

        result = await reloader.apply_document({"stages": [{"use": "noop"}, {"use": "sampler"}]})
        assert result.ok and result.graph_switched and result.version == 5
        assert result.chain_switch is not None and "inflight_events" in result.chain_switch
        assert [s.name for s in pipe.specs] == ["synthetic", "noop", "sampler", "null"]
        assert pipe.nodes[2] is not sampler

        stats = reloader.statistics()
        assert (stats.version, stats.failures, stats.reloads, stats.switches) == (5, 0, 4, 1)
        pipe.stop()
    assert pipe.ledger.snapshot().pending == 0
    logging.getLogger("bpfpipe").setLevel(logging.NOTSET)


async def test_a_failed_reload_changes_nothing_and_is_counted(capture_log: Any) -> None:
    records = capture_log("bpfpipe.reload")
    async with trio.open_nursery() as nursery:
        reloader, pipe = await running(nursery)
        before = reloader.effective()
        result = await reloader.apply_document(
            {"stages": [{"use": "sampler", "config": {"min_sample_rate": "x"}}]}
        )
        assert not result.ok and result.version == 1
        assert "stages[0].config.min_sample_rate: expected int" in result.error
        result = await reloader.apply_document({"limits": {"max_inflight_events": -1}})
        assert result.error.startswith("limits.max_inflight_events: ")
        assert reloader.effective() == before
        assert pipe.budget.max_events == decode_config(BASE).limits.max_inflight_events
        stats = reloader.statistics()
        assert (stats.version, stats.failures) == (1, 2) and "max_inflight_events" in stats.last_error

        def broken() -> dict[str, Any]:
            raise ConfigError("/etc/bpfpipe.toml", "invalid TOML: Expected '=' (at line 1, column 4)")

        reloader.read_config = broken
        result = await reloader.reload_file()
        assert not result.ok and result.error.startswith("/etc/bpfpipe.toml: invalid TOML")
        assert reloader.statistics().failures == 3
        pipe.stop()
    failures = [r for r in records if r.levelno == logging.ERROR]
    assert len(failures) == 3 and all("running config kept" in r.getMessage() for r in failures)


async def test_noop_and_restart_only_reloads_keep_the_version() -> None:
    async with trio.open_nursery() as nursery:
        reloader, pipe = await running(nursery)
        reloader.read_config = lambda: BASE
        result = await reloader.reload_file()
        assert result.ok and result.version == 1 and result.applied == []
        result = await reloader.apply_document({"ring_buffer_size": 8192, "admin_port": 1234})
        assert result.ok and result.version == 1
        assert result.restart_required == ["admin_port", "ring_buffer_size"]
        assert reloader.effective()["config"]["ring_buffer_size"] == 262144
        assert reloader.statistics().reloads == 2
        pipe.stop()


async def test_reloads_are_serialized() -> None:
    async with trio.open_nursery() as nursery:
        reloader, pipe = await running(nursery)
        results: list[Any] = []

        async def post(doc: dict[str, Any]) -> None:
            results.append(await reloader.apply_document(doc))

        async with trio.open_nursery() as posts:
            posts.start_soon(post, {"stages": [{"use": "noop"}, {"use": "sampler"}]})
            posts.start_soon(post, {"log_level": "warning"})
        assert sorted(r.version for r in results) == [2, 3]
        assert reloader.effective()["config"]["log_level"] == "warning"
        assert [s["use"] for s in reloader.effective()["config"]["stages"]] == ["noop", "sampler"]
        pipe.stop()
    logging.getLogger("bpfpipe").setLevel(logging.NOTSET)


async def test_a_reload_before_the_pipeline_runs_fails_cleanly() -> None:
    config = decode_config(BASE)
    specs, capacities = build_specs(config)
    reloader = Reloader(config)
    reloader.bind(Pipeline(specs, capacities, settings=config))
    result = await reloader.apply_document({"log_level": "debug"})
    assert not result.ok and "not running" in result.error


async def test_a_new_chain_that_cannot_be_built_changes_nothing() -> None:
    async with trio.open_nursery() as nursery:
        reloader, pipe = await running(nursery)
        before = list(pipe.nodes)
        bad = {"use": "breaker", "name": "guard", "config": {"primary": "no_such_module_here:Stage"}}
        result = await reloader.apply_document({"stages": [{"use": "sampler"}, bad]})
        assert not result.ok and result.version == 1
        assert "guard" in result.error and "no_such_module_here" in result.error
        assert pipe.nodes == before
        assert [s.name for s in pipe.specs] == ["synthetic", "sampler", "null"]
        result = await reloader.apply_document({"log_level": "warning"})  # and it still reloads
        assert result.ok and result.version == 2
        pipe.stop()
    logging.getLogger("bpfpipe").setLevel(logging.NOTSET)


def test_enforcer_reconfigure_takes_new_limits() -> None:
    from pipeline._enforcer import ResourceEnforcer
    from pipeline.config import LimitsConfig

    enforcer = ResourceEnforcer(LimitsConfig(), read_rss=lambda: 0)
    enforcer.reconfigure(LimitsConfig(max_memory_mb=10, max_map_entries=7, enforce_interval_s=0.25))
    assert enforcer.interval_s == 0.25
    assert (enforcer.governor.max_memory_bytes, enforcer.governor.max_map_entries) == (10 * 2**20, 7)
