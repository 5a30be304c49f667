"""Finding stages by import path and entry point; one-line errors for every failure."""

from __future__ import annotations

import pytest

from pipeline import Config, build_pipeline
from pipeline import resolve_stage as resolve
from pipeline._build import build_specs
from pipeline.config import decode_config
from pipeline.errors import StageLoadError
from pipeline.testing import make_batch, run_stages
from stages.noop import NoopStage


def config_with(stage: dict[str, object]) -> Config:
    return decode_config({"source": {"use": "synthetic"}, "stages": [stage], "sink": {"use": "null"}})


def test_builtin_names_resolve_through_entry_points() -> None:
    assert resolve("noop", stage="x") is NoopStage


def test_import_path() -> None:
    assert resolve("stages.noop:NoopStage", stage="x") is NoopStage


def test_third_party_entry_point_plugin() -> None:
    # tests/fixtures/testplugin is pip-installed into the test venv by `make test`.
    from bpfpipe_testplugin import ScaleValue

    specs, _ = build_specs(config_with({"use": "scale_value", "config": {"factor": 3}}))
    assert specs[1].factory is ScaleValue
    assert specs[1].config.factor == 3


async def test_third_party_stage_runs() -> None:
    from bpfpipe_testplugin import ScaleConfig, ScaleValue

    result = await run_stages([(ScaleValue, ScaleConfig(factor=5))], [make_batch(value=[1, 2, 3])])
    assert result.events["value"].tolist() == [5, 10, 15]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"use": "nosuchpkg.mod:X"},
            "stage 'nosuchpkg.mod:X': cannot import 'nosuchpkg.mod': No module named",
        ),
        (
            {"use": "stages.noop:Nope"},
            "stage 'stages.noop:Nope': module 'stages.noop' has no attribute 'Nope'",
        ),
        ({"use": "nosuch", "name": "s1"}, "stage 's1': no stage named 'nosuch' (known: "),
        ({"use": "null"}, "stage 'null': 'null' is a sink, not a stage"),
        ({"use": "json:dumps"}, "stage 'json:dumps': 'json:dumps' is a function, not a stage"),
        (
            {"use": "scale_value", "name": "scale", "config": {"factor": "x"}},
            "stage 'scale': stages[0].config.factor: expected int, got \"x\"",
        ),
        (
            {"use": "scale_value", "config": {"factr": 2}},
            "stage 'scale_value': stages[0].config.factr: unknown key (did you mean 'factor'?)",
        ),
    ],
)
def test_load_errors_are_one_line(stage: dict[str, object], message: str) -> None:
    with pytest.raises(StageLoadError) as info:
        build_pipeline(config_with(stage))
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_duplicate_names_rejected() -> None:
    config = decode_config(
        {
            "stages": [{"use": "noop"}, {"use": "noop"}],
            "source": {"use": "synthetic"},
            "sink": {"use": "null"},
        }
    )
    with pytest.raises(StageLoadError, match="stage 'noop': two stages have this name"):
        build_specs(config)


def test_source_config_errors_name_source_path() -> None:
    config = decode_config({"source": {"use": "synthetic", "config": {"batch_size": 0}}})
    with pytest.raises(StageLoadError, match=r"source\.config\.batch_size: expected int >= 1, got 0"):
        build_specs(config)


def test_edge_capacities_default_and_override() -> None:
    config = decode_config(
        {
            "source": {"use": "synthetic"},
            "channels": {"capacity": 7},
            "stages": [{"use": "noop", "name": "a", "capacity": 3}, {"use": "noop", "name": "b"}],
        }
    )
    _, capacities = build_specs(config)
    assert capacities == [3, 7, 7]


def test_bpf_sources_get_their_decoder_inserted() -> None:
    from stages.decoder import Decoder
    from stages.programs import ExecSource

    config = decode_config({"stages": [{"use": "noop"}], "sink": {"use": "null"}})
    specs, capacities = build_specs(config)  # the default source is the exec program
    assert [(s.name, s.factory) for s in specs[:2]] == [("exec", ExecSource), ("exec.decoder", Decoder)]
    assert [s.name for s in specs[2:]] == ["noop", "null"]
    assert len(capacities) == 3


# -- configs resolved when the graph is built ----------------------------------------------------


def test_stage_defaults_are_resolved_at_build_time() -> None:
    from pipeline._build import resolved_config

    config = decode_config(
        {
            "ring_buffer_size": 1 << 20,
            "bpf_map_size": 4096,
            "limits": {"max_events_per_sec": 5000},
            "source": {"use": "loadgen"},
            "stages": [{"use": "sampler"}],
            "sink": {"use": "null"},
        }
    )
    specs, _ = build_specs(config)
    reader, decoder, sampler, _sink = specs
    assert (reader.config.ring_buffer_size, reader.config.map_size) == (1 << 20, 4096)
    assert decoder.name == "loadgen.decoder"
    assert sampler.config.max_events_per_sec == 5000
    shown = resolved_config(config, specs)  # what `bpfpipe check` prints
    assert shown.source.config["ring_buffer_size"] == 1 << 20
    assert shown.stages[0].config["max_events_per_sec"] == 5000


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"use": "xdp_firewall", "config": {"options": {"interface": "lo", "mode": "turbo"}}},
            r"source\.config\.options\.mode: must be one of skb, driver",
        ),
        ({"use": "xdp_firewall"}, r"source\.config\.options\.interface: .*name the interface"),
        ({"use": "exec", "config": {"options": {"colour": 1}}}, r"source\.config\.options\.colour: "),
        (
            {"use": "ringbuf", "config": {"program": "nope"}},
            r"source\.config\.program: no BPF program 'nope'",
        ),
    ],
)
def test_program_options_are_checked_at_build_time_with_real_key_paths(
    source: dict[str, object], message: str
) -> None:
    with pytest.raises(StageLoadError, match=message):
        build_specs(decode_config({"source": source, "sink": {"use": "null"}}))
